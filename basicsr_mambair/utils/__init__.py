"""Utilities: checkpoint reading, recognition and checked loading."""

from .checkpoint import CheckpointError, LoadReport, detect_arch_type, infer_config, load_checked, read_state_dict

__all__ = ['CheckpointError', 'LoadReport', 'detect_arch_type', 'infer_config', 'load_checked', 'read_state_dict']
