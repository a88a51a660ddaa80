"""``python -m basicsr.train`` / ``python -m basicsr.test`` run basicsr-mambair's train / test.

Stock BasicSR cannot run MambaIR from ``python -m basicsr.train``: 1.4.2 does not import on torchvision >= 0.17,
its script runs before any plugin could register the archs and the official option dialect, it needs a GPU to
resume, and it puts experiments in site-packages (its root is the folder holding the installed package). No
plugin code runs before all that unless the interpreter starts it, so ``basicsr_mambair_redirect.pth`` (installed
into site-packages beside this module: setuptools' ``distutils-precedence.pth`` pattern) calls :func:`install`
when a command line names ``basicsr.``. :func:`install` wraps ``runpy._run_module_as_main``, which the interpreter
looks up after its start to run ``-m MODULE``, so that these two modules run ``basicsr_mambair.train`` /
``basicsr_mambair.test`` with the same arguments; everything else runs as it would.

Left as they are: a ``basicsr`` package in the current directory (e.g. a clone of the official MambaIR repository,
which has its own ``basicsr/``), and any run with ``MAMBAIR_STOCK_BASICSR=1``.
This module is outside the ``basicsr_mambair`` package because importing that imports torch and BasicSR; it must
stay cheap and never raise, as it runs at interpreter start (Python >= 3.10: it reads ``sys.orig_argv``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

REDIRECTS = {'basicsr.train': 'basicsr_mambair.train', 'basicsr.test': 'basicsr_mambair.test'}
OPT_OUT = 'MAMBAIR_STOCK_BASICSR'
_VALUE_FLAGS = 'cmXW'  # interpreter flags that take a value (-c and -m end the interpreter's options)


def module_of(argv: Sequence[str]) -> str | None:
    """MODULE of an interpreter command line ``python [flags] -m MODULE [args]`` (``sys.orig_argv``), else None."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ('-', '--') or not arg.startswith('-'):
            return None  # stdin, end of options, or a script
        if arg.startswith('--'):  # --check-hash-based-pycs MODE is the only long option with a value
            i += 2 if arg == '--check-hash-based-pycs' else 1
            continue
        for j, flag in enumerate(arg[1:], start=2):  # grouped flags: -um MODULE, -mMODULE, -Xdev
            if flag in _VALUE_FLAGS:
                value = arg[j:]
                if not value:
                    i += 1
                    value = argv[i] if i < len(argv) else None
                if flag in 'cm':
                    return value if flag == 'm' else None
                break
        i += 1
    return None


def _local_basicsr() -> bool:
    """Whether ``basicsr`` is a folder of the current directory (imported from there with ``-m``): the user's own
    code, e.g. the official repository's."""
    import importlib.util

    spec = importlib.util.find_spec('basicsr')
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    cwd = os.path.realpath(os.getcwd())
    return any(os.path.dirname(os.path.realpath(p)) == cwd for p in locations)


def install() -> None:
    """Redirect ``-m basicsr.train`` / ``-m basicsr.test`` of this interpreter (see the module's docstring)."""
    try:
        if os.environ.get(OPT_OUT, '0') not in ('', '0') or module_of(getattr(sys, 'orig_argv', ())) not in REDIRECTS:
            return
        import runpy

        run = runpy._run_module_as_main
        if getattr(run, 'mambair_redirect', False):
            return

        def _run_module_as_main(mod_name: str, alter_argv: bool = True):
            if mod_name in REDIRECTS and not _local_basicsr():
                if os.environ.get('RANK', '0') == '0':
                    print(f'python -m {mod_name}: running {REDIRECTS[mod_name]} (BasicSR\'s pipeline with the '
                          f'MambaIR archs, the official option dialect and the CPU fixes); {OPT_OUT}=1 runs stock '
                          'BasicSR', file=sys.stderr, flush=True)
                mod_name = REDIRECTS[mod_name]
            return run(mod_name, alter_argv)

        _run_module_as_main.mambair_redirect = True
        runpy._run_module_as_main = _run_module_as_main
    except Exception:  # noqa: BLE001 - whatever happens here, the interpreter must start
        pass
