"""Utilities: checkpoint reading, checked loading and atomic saving; atomic files; MATLAB's bicubic resize."""

from .checkpoint import LoadReport, load_checked, read_state_dict, save_atomic, strip_module_prefix

__all__ = ['LoadReport', 'load_checked', 'read_state_dict', 'save_atomic', 'strip_module_prefix']
