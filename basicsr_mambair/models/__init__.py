"""Imports every `*_model.py` module here so that its classes register in BasicSR (HAT/Real-ESRGAN convention)."""

import importlib
from pathlib import Path

_MODULES = [
    importlib.import_module(f'{__name__}.{path.stem}') for path in sorted(Path(__file__).parent.glob('*_model.py'))
]
