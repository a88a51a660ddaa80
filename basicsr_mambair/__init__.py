"""MambaIR image-restoration networks as a BasicSR plugin.

Importing this package registers its archs, datasets and models in BasicSR's registries and installs
its fixes into BasicSR's pipelines (:func:`basicsr_mambair.compat.patch_basicsr`: the official option
dialect, CPU resume and DDP), so ``import basicsr_mambair`` before BasicSR's ``train_pipeline`` gives
what ``mambair-train`` does. It never imports the optional CUDA packages ``mamba_ssm`` / ``causal_conv1d``.
"""

from .compat import alias_functional_tensor, patch_basicsr

alias_functional_tensor()  # must precede the first `import basicsr`

from . import archs, data, models  # noqa: E402,F401  (registration side effects)

patch_basicsr()
from .errors import (  # noqa: E402
    CheckpointError,
    ImageError,
    MambaIRError,
    OptionError,
    OutOfMemory,
    RestoreError,
)
from .version import __version__  # noqa: E402

__all__ = ['__version__', 'CheckpointError', 'ImageError', 'MambaIRError', 'OptionError', 'OutOfMemory',
           'RestoreError', 'RestoreModel', 'load_model', 'restore']

_API = ('RestoreModel', 'load_model', 'restore')


def __getattr__(name: str):
    """The API (:mod:`.api`) on first use: importing the package stays as cheap as importing BasicSR."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
