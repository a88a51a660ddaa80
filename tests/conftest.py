"""Shared fixtures: single-threaded torch and the ../shared data (helpers for the tests: helpers.py)."""

from __future__ import annotations

import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # noisy shared cores: tests never race for threads

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the triton scan's kernels run in Triton's interpreter (test_triton_scan.py);
    os.environ.setdefault('TRITON_INTERPRET', '1')  # Triton reads this when first imported, so set it first

from helpers import shared_dir  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """``../shared/data`` (real benchmark images)."""
    return shared_dir('data')


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    """``../shared/reference`` (tensors produced by the official implementation)."""
    return shared_dir('reference')
