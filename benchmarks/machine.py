"""What machine a benchmark ran on (the README states it next to every number)."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    """CPU model, logical cores, Python/torch versions, torch's CPU kernel level and the load average now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': cpu, 'logical_cores': os.cpu_count(), 'python': platform.python_version(),
            'torch': torch.__version__, 'capability': torch.backends.cpu.get_cpu_capability(),
            'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None}


def describe() -> str:
    """:func:`machine` in one line."""
    m = machine()
    load = f", load average {m['load_average'][0]:.1f}" if m['load_average'] else ''
    return f"{m['cpu']} ({m['capability']}), {m['logical_cores']} logical cores, torch {m['torch']}{load}"
