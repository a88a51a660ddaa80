"""Helpers the test modules share: where ../shared is, running our commands, arch classes, scan checks.

Imported as ``from helpers import ...`` (pytest puts this folder on sys.path); fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import basicsr_mambair  # noqa: F401  (before any `import basicsr`: torchvision alias for BasicSR 1.4.2)
from basicsr_mambair.archs.support import constructor_defaults

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('MAMBAIR_SHARED', REPO.parent / 'shared'))
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


def shared_dir(name: str) -> Path:
    """``../shared/<name>``. Where it is missing a user's clone skips the test; CI (``CI=true``) fails it."""
    path = SHARED / name
    if not path.is_dir():
        message = f'{path} not found (../shared beside the repository, or set MAMBAIR_SHARED)'
        if IN_CI:
            pytest.fail(f'CI=true and {message}', pytrace=False)
        pytest.skip(message)
    return path

# Reference tensors of the official MambaIR/MambaIRUNet in ../shared/reference (test_mambair_arch checks
# that the list covers every such file).
REFERENCE_FILES = ['mambair_lightSR_x2.pt', 'tiny_mambair_CAR.pt', 'tiny_mambair_classicSR_x2.pt',
                   'tiny_mambair_classicSR_x3.pt', 'tiny_mambair_colorDN.pt', 'tiny_mambairunet.pt']
# ... and of the official MambaIRv2 / MambaIRv2Light (test_mambairv2_arch checks this list the same way).
V2_REFERENCE_FILES = ['mambairv2_lightSR_x2.pt', 'tiny_mambairv2_CAR.pt', 'tiny_mambairv2_SR_x2.pt',
                      'tiny_mambairv2_SR_x3.pt', 'tiny_mambairv2_colorDN.pt', 'tiny_mambairv2light_x4.pt']

CONSOLE_SCRIPTS = {
    'mambair-train': 'basicsr_mambair.train',
    'mambair-test': 'basicsr_mambair.test',
    'mambair-demo': 'basicsr_mambair.cli.demo',
    'mambair-restore': 'basicsr_mambair.cli.restore',
    'mambair-export': 'basicsr_mambair.cli.export',
    'mambair-convert': 'basicsr_mambair.cli.convert',
    'mambair-profile': 'basicsr_mambair.cli.profile',
    'mambair-prepare-sidd': 'basicsr_mambair.cli.prepare_sidd',
    'mambair-extract-subimages': 'basicsr_mambair.cli.extract_subimages',
    'mambair-make-lr': 'basicsr_mambair.cli.make_lr',
    'mambair-make-jpeg': 'basicsr_mambair.cli.make_jpeg',
    'mambair-make-lmdb': 'basicsr_mambair.cli.make_lmdb',
    'mambair-make-meta-info': 'basicsr_mambair.cli.make_meta_info',
}


# The smallest real MambaIR (channel attention needs >= 30 channels): x2, light-SR head, 0.03 M parameters.
TINY_MAMBAIR = dict(upscale=2, in_chans=3, embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0,
                    upsampler='pixelshuffledirect')


def tiny_checkpoint(path: Path, seed: int = 0, edit=None, **kwargs) -> Path:
    """Save ``{'params': state_dict}`` of a random-weight ``MambaIR(**TINY_MAMBAIR, **kwargs)`` at ``path``;
    ``edit(state_dict)`` may change tensors first (e.g. plant a NaN)."""
    torch.manual_seed(seed)
    state = arch_class('MambaIR')(**{**TINY_MAMBAIR, **kwargs}).state_dict()
    if edit is not None:
        edit(state)
    torch.save({'params': state}, path)
    return path


def cli_command(script: str) -> list[str]:
    """The installed console script if this environment has it, else ``python -m`` its module."""
    exe = Path(sys.executable).parent / script
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, '-m', CONSOLE_SCRIPTS[script]]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env['OMP_NUM_THREADS'] = '1'
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def arch_class(arch_type: str) -> type[torch.nn.Module]:
    """The class registered in BasicSR's ARCH_REGISTRY (what option files build)."""
    from basicsr.utils.registry import ARCH_REGISTRY  # after basicsr_mambair (torchvision alias)

    return ARCH_REGISTRY.get(arch_type)


def constructor_args(arch_type: str, kwargs: dict) -> dict:
    """Every constructor argument of the arch: its defaults overridden by ``kwargs``, tuples as lists."""
    full = {**constructor_defaults(arch_type), **kwargs}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def run_cli(script: str, *args: str, cwd: Path, timeout: float = 600, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
    """Run one of our console scripts in ``cwd``; on failure show its output."""
    proc = subprocess.run([*cli_command(script), *args], cwd=cwd, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {" ".join(args)} exited {proc.returncode}\n'
                             f'--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}')
    return proc


def _namespace_command() -> list[str] | None:
    """``unshare`` arguments giving a private mount namespace where a tmpfs can be mounted (root, or user
    namespaces), or None."""
    if shutil.which('unshare') is None:
        return None
    script = 'd=$(mktemp -d) && mount -t tmpfs -o size=12k tmpfs "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc'
    for cmd in (['unshare', '-m'], ['unshare', '-r', '-m']):
        if subprocess.run([*cmd, 'sh', '-c', script], capture_output=True).returncode == 0:
            return cmd
    return None


def mount_namespace():
    """``run(script, cwd)``: a shell script in a private mount namespace (its tmpfs mounts, e.g. a full or
    read-only disk, vanish with it). Skips where the machine allows no such namespace: a capability of the
    machine, not of the code (the fake-writer tests cover the same code paths everywhere)."""
    cmd = _namespace_command()
    if cmd is None:
        pytest.skip('a private mount namespace (unshare -m, as root or with user namespaces) is not available')

    def run(script: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, 'sh', '-c', script], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                              timeout=timeout)

    return run


def shell_words(cmd: list[str]) -> str:
    """``cmd`` quoted for ``sh -c``."""
    return ' '.join(shlex.quote(c) for c in cmd)


# ------------------------------------------------------------------------------------------------
# selective scan checks (test_selective_scan.py, test_compiled_scan.py)
# ------------------------------------------------------------------------------------------------
HAS_COMPILER = any(shutil.which(c) for c in ('cc', 'gcc', 'clang'))


def require_kernel(load) -> None:
    """Call a C kernel's ``load()``: where a C compiler exists it must build and pass its self-check (a failure is
    a bug, not a skip); only a machine without one skips."""
    from basicsr_mambair.errors import KernelUnavailable

    try:
        load()
    except KernelUnavailable as exc:
        if HAS_COMPILER:
            pytest.fail(f'the compiled scan does not build with the compiler present: {exc}')
        pytest.skip(f'no C compiler: {exc}')


SCAN_GRAD_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
# the optional parts of a scan call, each combination a test case (pytest.param with an id)
SCAN_OPTION_CASES = [
    pytest.param(dict(use_d=False, use_z=False, use_bias=False, softplus=False, last_state=False), id='bare'),
    pytest.param(dict(use_d=True, use_z=False, use_bias=True, softplus=True, last_state=False), id='mambair'),
    pytest.param(dict(use_d=False, use_z=True, use_bias=False, softplus=True, last_state=True), id='z+last'),
    pytest.param(dict(use_d=True, use_z=True, use_bias=True, softplus=False, last_state=True), id='all-no-softplus'),
]


def scan_with_grads(fn, inputs, use_d=True, use_z=True, use_bias=True, softplus=True, last_state=True, seed=1,
                    **kw):
    """Output, last state and gradients of a fixed random loss w.r.t. every used input of a selective scan
    ``fn`` (signature of ``selective_scan``) on ``inputs`` (a dict with the keys of SCAN_GRAD_NAMES)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(leaves['u'], leaves['delta'], leaves['A'], leaves['B'], leaves['C'], leaves['D'] if use_d else None,
           z=leaves['z'] if use_z else None, delta_bias=leaves['delta_bias'] if use_bias else None,
           delta_softplus=softplus, return_last_state=last_state, **kw)
    y, last = y if last_state else (y, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64).to(y.device)).sum()
    skipped = {k for k, used in (('D', use_d), ('z', use_z), ('delta_bias', use_bias)) if not used}
    used = [k for k in SCAN_GRAD_NAMES if k not in skipped]
    grads = torch.autograd.grad(loss, [leaves[k] for k in used])
    return y.detach(), (None if last is None else last.detach()), dict(zip(used, grads))


def assert_close(actual, expected, rtol=1e-5, name=''):
    """Agreement to ``rtol`` relative to the largest reference magnitude."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f'{name}: non-finite values'
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f'{name}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})'
