"""Numerical kernels: the selective scan of Mamba (:mod:`.scan`: CUDA kernel, C kernel or exact pure PyTorch)."""

from .scan import get_backend, scan_backend, selective_scan, selective_scan_reference

__all__ = ['selective_scan', 'selective_scan_reference', 'scan_backend', 'get_backend']
