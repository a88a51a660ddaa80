"""The compiled scan kernel's cache is trusted only if it is ours (issue 16, item 5): a library planted in a
world-writable or foreign-owned cache folder, or one we did not build, is never loaded (its constructor would
run at ``dlopen``); ``$CC`` that is not an executable is one line."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from basicsr_mambair.errors import KernelUnavailable
from basicsr_mambair.ops import scan as ss
from basicsr_mambair.ops.scan import compiled, selective_scan

PLANTED_C = r'''
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("MAMBAIR_TEST_MARKER");
    if (marker) close(open(marker, O_CREAT | O_WRONLY, 0600));
}
'''
FAKE_CC = '''#!/bin/sh
if [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi
prev=; for a; do [ "$prev" = -o ] && out=$a; prev=$a; done
echo build >> {log}
cp {good} "$out"
'''


def _cc() -> str:
    cc = next((shutil.which(c) for c in ('cc', 'gcc', 'clang') if shutil.which(c)), None)
    if cc is None:
        pytest.fail('these tests need a C compiler (cc, gcc or clang)')
    return cc


@pytest.fixture(scope='module')
def libraries(tmp_path_factory) -> dict[str, Path]:
    """``good``: the kernel built once by the package; ``planted``: a library whose constructor touches
    ``$MAMBAIR_TEST_MARKER``."""
    folder = tmp_path_factory.mktemp('libs')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('MAMBAIR_CACHE_DIR', str(folder / 'cache'))
        patch.delenv('CC', raising=False)
        compiled.reset()
        good = Path(compiled.load()._name)
        compiled.reset()
    (folder / 'planted.c').write_text(PLANTED_C)
    subprocess.run([_cc(), '-shared', '-fPIC', str(folder / 'planted.c'), '-o', str(folder / 'planted.so')],
                   check=True)
    return {'good': good, 'planted': folder / 'planted.so'}


@pytest.fixture
def env(monkeypatch, tmp_path: Path) -> dict[str, Path]:
    """A cache folder, a temporary folder (the fallback's parent) and a marker, all under tmp_path."""
    paths = {'cache': tmp_path / 'cache', 'tmp': tmp_path / 'tmp', 'marker': tmp_path / 'PWNED'}
    paths['tmp'].mkdir()
    paths['fallback'] = paths['tmp'] / f'basicsr_mambair-{os.geteuid()}'
    monkeypatch.setenv('MAMBAIR_CACHE_DIR', str(paths['cache']))
    monkeypatch.setattr(compiled.tempfile, 'tempdir', str(paths['tmp']))
    monkeypatch.setenv('MAMBAIR_TEST_MARKER', str(paths['marker']))
    monkeypatch.delenv('CC', raising=False)
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    compiled.reset()
    ss.reset()
    yield paths
    compiled.reset()
    ss.reset()


def _names(cc: str) -> list[str]:
    return [name for _, name in compiled._attempts(cc, compiled._compiler_version(cc))]


def _plant(folder: Path, library: Path, names: list[str], record: bool) -> None:
    """``library`` under every kernel name in ``folder``; with ``record``, also the hash records a build writes."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in names:
        shutil.copy(library, folder / name)
        if record:
            (folder / f'.{name}.sha256').write_text(hashlib.sha256(library.read_bytes()).hexdigest() + '\n')


def test_planted_library_in_a_world_writable_cache_is_never_loaded(env, libraries) -> None:
    """The reproduction: a writable cache folder holding ``scan_kernel-<key>.so`` (with a forged hash record).
    The folder is not trusted; the kernel comes from the private fallback folder instead."""
    names = _names(_cc())
    _plant(env['cache'], libraries['planted'], names, record=True)
    env['cache'].chmod(0o777)
    _plant(env['fallback'], libraries['good'], names, record=True)  # a good earlier build: no compiler run
    lib = compiled.load()
    assert not env['marker'].exists(), 'the planted library was loaded'
    assert Path(lib._name).parent == env['fallback'].resolve()


def test_planted_library_in_foreign_folders_is_never_loaded(env, libraries, monkeypatch, caplog) -> None:
    """Both candidate folders belong to another user (as a predictable /tmp folder made by someone else does):
    no library is loaded, the scan runs on the torch backend, and the reason is one line."""
    names = _names(_cc())
    _plant(env['cache'], libraries['planted'], names, record=True)
    _plant(env['fallback'], libraries['planted'], names, record=True)
    if os.geteuid() == 0:  # really another owner
        for folder in (env['cache'], env['fallback']):
            os.chown(folder, 65534, 65534)
    else:  # we cannot give files away: be someone else instead
        uid = os.geteuid() + 1
        monkeypatch.setattr(compiled.os, 'geteuid', lambda: uid)
        monkeypatch.setattr(compiled.tempfile, 'tempdir', str(env['tmp']))
        env['fallback'].rename(env['tmp'] / f'basicsr_mambair-{uid}')
    with pytest.raises(KernelUnavailable) as info:
        compiled.load()
    message = str(info.value)
    assert 'no safe, writable folder for the built kernel' in message and 'is owned by user id' in message
    assert '\n' not in message and not env['marker'].exists()
    ss.reset()
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 10, generator=g), torch.rand(1, 4, 10, generator=g)
    a, b, c = -torch.rand(4, 3, generator=g), torch.randn(1, 3, 10, generator=g), torch.randn(1, 3, 10, generator=g)
    with caplog.at_level(logging.INFO, logger='basicsr'), torch.no_grad():
        y = selective_scan(u, delta, a, b, c)
    assert ss.get_backend('cpu') == 'torch' and 'no safe, writable folder' in caplog.text
    with torch.no_grad():
        assert torch.equal(y, selective_scan(u, delta, a, b, c, backend='torch'))
    assert not env['marker'].exists()


@pytest.mark.parametrize('record', ['none', 'of another file'])
def test_library_we_did_not_build_is_rebuilt(env, libraries, tmp_path: Path, monkeypatch, record: str) -> None:
    """In our own (0700) folder: a library without the hash recorded at its build, or with another file's hash,
    is rebuilt over instead of loaded; a library we built is loaded without compiling."""
    log = tmp_path / 'builds.log'
    fake = tmp_path / 'fakecc'
    fake.write_text(FAKE_CC.format(log=log, good=libraries['good']))  # "compiles" by copying the good kernel
    fake.chmod(0o755)
    monkeypatch.setenv('CC', str(fake))
    names = _names(str(fake))
    _plant(env['cache'], libraries['planted'], names, record=False)
    if record != 'none':
        for name in names:
            (env['cache'] / f'.{name}.sha256').write_text(hashlib.sha256(libraries['good'].read_bytes()).hexdigest())
    lib = compiled.load()
    assert not env['marker'].exists(), 'the planted library was loaded'
    assert log.read_text() == 'build\n'
    target = Path(lib._name)
    assert target.parent == env['cache'].resolve() and target.read_bytes() == libraries['good'].read_bytes()
    assert (target.parent / f'.{target.name}.sha256').read_text().strip() == hashlib.sha256(
        target.read_bytes()).hexdigest()
    assert (env['cache'].stat().st_mode & 0o777) == 0o700
    compiled.reset()
    assert Path(compiled.load()._name) == target and log.read_text() == 'build\n'  # cached: no second build


def test_cc_that_is_not_an_executable_is_one_line(env, tmp_path: Path, monkeypatch) -> None:
    not_executable = tmp_path / 'cc.txt'
    not_executable.write_text('not a compiler')
    for cc in (str(not_executable), 'no-such-compiler-here'):
        monkeypatch.setenv('CC', cc)
        compiled.reset()
        with pytest.raises(KernelUnavailable) as info:
            compiled.load()
        assert str(info.value) == (f"$CC is {cc!r}, which is not an executable (unset CC or point it at a C "
                                   'compiler)')
