"""Mixed-precision training (``train: use_amp: bf16 | fp16``), which BasicSR does not have.

The forward runs under ``torch.autocast``; the selective scan and the sums around it stay float32 (SS2D turns
autocast off around them); the losses are computed in float32 from the float32-cast output; the parameters,
optimizer state and checkpoints stay float32. fp16 needs a ``GradScaler`` (its gradients underflow otherwise)
and a CUDA GPU; bf16 has float32's range and runs on CPUs and GPUs alike.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ['AMP_DTYPES', 'MixedPrecision', 'amp_dtype']

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def amp_dtype(value: Any, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a ``train:use_amp`` value on ``device_type`` ('cpu' / 'cuda'), None for off
    (absent, ``false`` or ``fp32``); ValueError with one line naming the option for anything else."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == 'fp32'):
        return None
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in AMP_DTYPES:
        raise ValueError(f'train:use_amp must be bf16, fp16 or false, not {value!r}')
    if key == 'fp16' and device_type != 'cuda':
        raise ValueError(f'train:use_amp: fp16 needs a CUDA GPU (training runs on {device_type}); use bf16 there')
    if key == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError('train:use_amp: this GPU does not support bf16; use fp16')
    return AMP_DTYPES[key]


class MixedPrecision:
    """One training step's precision handling: autocast for the forward, loss scaling for fp16.

    With ``value`` off every method is the plain float32 step (``backward`` = ``loss.backward()``, ...).
    """

    def __init__(self, value: Any, device: torch.device | str):
        self.device_type = torch.device(device).type
        self.dtype = amp_dtype(value, self.device_type)
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return next((k for k, v in AMP_DTYPES.items() if v == self.dtype), 'fp32')

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (losses belong outside: they are computed in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(); with fp16 skipped when the gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
