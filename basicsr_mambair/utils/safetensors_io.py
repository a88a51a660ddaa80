"""BasicSR checkpoints as ``.safetensors`` files (tensors and a JSON header: nothing is unpickled).

A BasicSR checkpoint is ``{'params': state_dict}`` and sometimes ``'params_ema'`` besides; safetensors holds one
flat ``{name: tensor}`` table plus string metadata. The layout written here:

* the tensors: with one entry (every released MambaIR checkpoint) under their own names, so spandrel,
  chaiNNer or ``safetensors.torch.load_file`` + ``load_state_dict`` read the file as a plain state dict; with
  several entries as ``<entry>/<name>`` (``params_ema/conv_first.weight``: module names contain no ``/``);
* the metadata ``basicsr_mambair.entries``: JSON ``{entry: [names in state-dict order]}``, which keeps
  ``params`` / ``params_ema`` apart and the key order (safetensors sorts its table), and ``format: pt``.

A file without our metadata is read as a bare state dict (keys in the file's sorted order), as any other
safetensors checkpoint.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from .files import atomic_write_bytes

__all__ = ['ENTRIES_KEY', 'SUFFIX', 'is_safetensors', 'load_safetensors', 'save_safetensors']

SUFFIX = '.safetensors'
ENTRIES_KEY = 'basicsr_mambair.entries'
SEPARATOR = '/'


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a safetensors file (by its suffix, as spandrel and chaiNNer decide)."""
    return os.fspath(path).lower().endswith(SUFFIX)


def _safetensors_module():
    try:
        import safetensors.torch  # a small dependency; imported only for .safetensors files
    except ImportError:
        raise CheckpointError('reading or writing .safetensors files needs the safetensors package '
                              '(pip install safetensors)') from None
    return safetensors


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint in a safetensors file, as ``torch.load`` of the equal ``.pth`` would return it.

    ``{entry: state_dict}`` for a file written by :func:`save_safetensors`, else the bare state dict; tensors on
    the CPU. Raises :class:`CheckpointError` for a corrupt or truncated file or inconsistent metadata.
    """
    path = os.fspath(path)
    st = _safetensors_module()
    try:
        with st.safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001  (SafetensorError, OSError, ...: all mean an unreadable file)
        detail = ' '.join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f'cannot read checkpoint {path}: the file is truncated or corrupt, or not a '
                              f'safetensors file ({type(exc).__name__}: {detail})') from None
    if ENTRIES_KEY not in metadata:
        return tensors
    try:
        entries = json.loads(metadata[ENTRIES_KEY])
        if not isinstance(entries, dict) or not all(isinstance(v, list) for v in entries.values()):
            raise ValueError('not a JSON object of key lists')
    except ValueError as exc:
        raise CheckpointError(f'{path}: metadata {ENTRIES_KEY} is damaged ({exc})') from None
    prefixed = len(entries) > 1
    result: dict[str, Any] = {}
    for entry, names in entries.items():
        stored = [f'{entry}{SEPARATOR}{n}' if prefixed else n for n in names]
        missing = [s for s in stored if s not in tensors]
        if missing:
            raise CheckpointError(f'{path}: metadata {ENTRIES_KEY} lists tensors the file lacks: '
                                  f'{", ".join(missing[:5])}')
        result[entry] = OrderedDict((n, tensors.pop(s)) for n, s in zip(names, stored))
    if tensors:
        raise CheckpointError(f'{path}: tensors outside every entry of {ENTRIES_KEY}: {", ".join(list(tensors)[:5])}')
    return result


def save_safetensors(entries: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike) -> None:
    """Write ``{entry: state_dict}`` (e.g. ``{'params': ...}``) to ``path`` atomically, in the layout above.

    Tensors are written as they are (dtype and shape); ones sharing memory are stored as copies (safetensors
    refuses aliases). Raises :class:`CheckpointError` for an empty checkpoint or a non-tensor value.
    """
    st = _safetensors_module()
    if not entries or not all(entries.values()):
        raise CheckpointError('nothing to write: the checkpoint has no tensors')
    bad = [f'{e}.{k}' for e, sd in entries.items() for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'only tensors can be written to a safetensors file, not: {", ".join(bad[:5])}')
    prefixed = len(entries) > 1
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for entry, state_dict in entries.items():
        for name, tensor in state_dict.items():
            tensor = tensor.detach().to('cpu').contiguous()
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen and tensor.numel():
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            flat[f'{entry}{SEPARATOR}{name}' if prefixed else name] = tensor
    metadata = {'format': 'pt', ENTRIES_KEY: json.dumps({e: list(sd) for e, sd in entries.items()})}
    # serialised in memory and written like our other files (safetensors' save_file makes them owner-only, 0600)
    atomic_write_bytes(path, st.torch.save(flat, metadata=metadata))
