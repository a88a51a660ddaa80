"""Numerical kernels: the selective scan of Mamba (:mod:`.scan`: mamba_ssm or Triton on GPUs, a C kernel on CPUs,
exact pure PyTorch anywhere)."""

from .scan import get_backend, scan_backend, selective_scan, selective_scan_reference

__all__ = ['selective_scan', 'selective_scan_reference', 'scan_backend', 'get_backend']
