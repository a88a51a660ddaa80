"""Utilities: checkpoint reading, recognition and checked loading."""

from .checkpoint import (
    CheckpointError,
    LoadReport,
    detect_arch_type,
    explain_preset_mismatch,
    infer_config,
    load_checked,
    matching_presets,
    read_state_dict,
)

__all__ = ['CheckpointError', 'LoadReport', 'detect_arch_type', 'explain_preset_mismatch', 'infer_config',
           'load_checked', 'matching_presets', 'read_state_dict']
