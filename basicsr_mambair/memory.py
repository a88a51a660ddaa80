"""Memory: what a forward needs, what the device has, and the tile size that fits (``tile='auto'``).

Peak = ``FIXED_BYTES`` + whole-image buffers + tile pixels x bytes per LQ pixel, where the per-pixel bytes come
from the arch's support module (:attr:`basicsr_mambair.archs.support.ArchInfo.bytes_per_pixel`, calibrated by
``benchmarks/bench_memory.py``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .archs.support import ArchInfo
from .ops.scan import uses_fused_kernel

# The pure-PyTorch scan's work buffers (a few groups of GROUP_ELEMS float32 values) do not grow with the
# tile; measured intercepts were 1-10 MB. 32 MiB covers them.
FIXED_BYTES = 32 << 20
# Share of the free memory a forward may plan to use: the CPU is shared with other programs; on CUDA the
# caching allocator fragments, and cuDNN wants workspace.
MEMORY_FRACTION = {'cpu': 0.5, 'cuda': 0.75}
MIN_AUTO_TILE = 32
TILE_MULTIPLE = 8  # automatic tiles are multiples of this (and of the arch's size multiple)


def measure_peak_bytes(net: nn.Module, channels: int, side: int) -> int:
    """Peak bytes allocated by the CPU allocator during one forward of a (1, channels, side, side) input.

    From ``torch.profiler`` memory events; calibrates the support modules' ``bytes_per_pixel`` (see
    ``benchmarks/bench_memory.py`` and the tests).
    """
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(1, channels, side, side)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net(x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]')
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cgroup_available() -> int | None:
    """Bytes left under a cgroup-v2 memory limit (containers), or None where there is none."""
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            limit = f.read().strip()
        if limit == 'max':
            return None
        with open('/sys/fs/cgroup/memory.current') as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int:
    """Bytes a forward on ``device`` can still get.

    CUDA: ``torch.cuda.mem_get_info`` free memory plus what PyTorch's cache holds unused. CPU:
    ``MemAvailable`` of ``/proc/meminfo`` (else ``os.sysconf`` free pages, else 4 GiB), capped by a
    cgroup-v2 limit.
    """
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (AttributeError, ValueError, OSError):
            available = 4 << 30
    limit = _cgroup_available()
    return min(available, limit) if limit is not None else available


def _image_bytes(info: ArchInfo, height: int, width: int) -> int:
    """Whole-image buffers around the network: the LQ tensor and its copies, the blended output and weights."""
    pixels = height * width
    return 4 * pixels * (2 * info.in_channels + 3 * (info.out_channels + 1) * info.scale ** 2)


def bytes_per_pixel(info: ArchInfo, device: torch.device) -> int:
    """Estimated peak activation bytes per LQ pixel of a forward on ``device``: ``info.scan_bytes_per_pixel`` where
    the selective scans run the fused CPU kernel (it computes in float32 at every precision), else
    ``info.bytes_per_pixel``."""
    if info.scan_bytes_per_pixel is not None and uses_fused_kernel(torch.device(device), torch.float32):
        return info.scan_bytes_per_pixel
    return info.bytes_per_pixel


def choose_tile(info: ArchInfo, device: torch.device, height: int, width: int, overlap: int = 32,
                available: int | None = None) -> int:
    """The LQ tile side for an ``height`` x ``width`` image: 0 (whole image) if it fits, else the largest fitting one.

    Peak = ``FIXED_BYTES`` + whole-image buffers + tile pixels x :func:`bytes_per_pixel`, to fit into
    ``MEMORY_FRACTION`` of ``available`` (default: :func:`available_memory` of ``device``). Tiles are multiples
    of 8 (and of the arch's size multiple), at least ``max(32, 2 * overlap)`` (rounded up to that multiple).
    """
    if available is None:
        available = available_memory(device)
    per_pixel = bytes_per_pixel(info, device)
    budget = int(available * MEMORY_FRACTION.get(device.type, 0.5)) - FIXED_BYTES - _image_bytes(info, height, width)
    if height * width * per_pixel <= budget:
        return 0
    multiple = math.lcm(TILE_MULTIPLE, info.size_multiple)
    side = math.isqrt(max(budget, 0) // per_pixel) // multiple * multiple
    least = -(-max(MIN_AUTO_TILE, 2 * overlap) // multiple) * multiple  # the floor is a multiple too
    return max(side, least)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of the CPU or CUDA allocator."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text.lower())
