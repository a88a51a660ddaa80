"""Numerical kernels: the selective scan of Mamba (CUDA kernel or exact pure PyTorch)."""

from .selective_scan import selective_scan

__all__ = ['selective_scan']
