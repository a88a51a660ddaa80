"""``mambair-convert``: checkpoints from ``.pth`` to ``.safetensors`` and back.

The safetensors layout (one entry under plain names; several as ``<entry>/<name>``; the entries and key order in
the metadata ``basicsr_mambair.entries``) is :mod:`basicsr_mambair.utils.safetensors_io`. Files are written
atomically and never replace an existing file without ``--overwrite``. Exit status: 0 all converted or skipped,
1 some failed, 2 nothing ran.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError, MambaIRError, OptionError
from .common import EXIT_NOTHING_RAN, EXIT_OK, EXIT_SOME_FAILED, error, note, run_command

PROG = 'mambair-convert'
PTH_SUFFIXES = ('.pth', '.pt', '.ckpt')
EPILOG = """\
examples:
  mambair-convert MambaIR_lightSR_x4.pth                 # -> MambaIR_lightSR_x4.safetensors beside it
  mambair-convert net_g.safetensors -o net_g.pth          # and back
  mambair-convert experiments/*/models/net_g_*.pth -o converted/
  mambair-convert net_g_latest.pth --param-key params_ema -o ema.safetensors

A .safetensors file holds the weights under their own names when the checkpoint has one entry ('params',
as every released MambaIR checkpoint), so spandrel/chaiNNer and safetensors.torch.load_file read it as a state
dict; a checkpoint with 'params' and 'params_ema' keeps both, as 'params/<name>' and 'params_ema/<name>', and
the metadata 'basicsr_mambair.entries' names them. mambair-restore, load_model, pretrain_network_g and
mambair-profile read either format. Converting back writes {'params': ..., 'params_ema': ...} as BasicSR does;
a bare state dict becomes 'params'."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Convert checkpoints between .pth (torch.save) and .safetensors, keeping params / params_ema.',
        epilog=EPILOG)
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='.pth / .pt / .ckpt or .safetensors files')
    parser.add_argument('-o', '--output', metavar='PATH',
                        help='output file (one input; its suffix chooses the format) or folder (created); '
                             'default: beside each input, with the other format\'s suffix')
    parser.add_argument('--param-key', metavar='KEY',
                        help='write only this entry (e.g. params_ema), as the single entry (default: all)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs (default: skip them)')
    return parser


def _other_suffix(path: Path) -> str:
    return '.pth' if path.suffix.lower() == '.safetensors' else '.safetensors'


def _targets(inputs: list[Path], output: str | None) -> list[Path]:
    """Where each input goes (see ``--output``)."""
    if output is None:
        return [p.with_suffix(_other_suffix(p)) for p in inputs]
    out = Path(output)
    is_file = out.suffix.lower() in (*PTH_SUFFIXES, '.safetensors') and not out.is_dir()
    if is_file:
        if len(inputs) > 1:
            raise OptionError(f'-o {output} names one file, but there are {len(inputs)} inputs: give a folder')
        return [out]
    targets = [out / (p.stem + _other_suffix(p)) for p in inputs]
    if len(set(targets)) < len(targets):
        raise OptionError(f'two inputs would be written to the same file in {output} (same name)')
    return targets


def convert(source: Path, target: Path, param_key: str | None = None) -> str:
    """Convert one file; returns a one-line description of what was written."""
    from ..archs.support import detect_arch_type
    from ..utils.checkpoint import checkpoint_entries, read_checkpoint, save_atomic, strip_module_prefix
    from ..utils.safetensors_io import is_safetensors, save_safetensors

    entries, others = checkpoint_entries(read_checkpoint(source), str(source))
    if param_key is not None:
        if param_key not in entries:
            raise CheckpointError(f'no state dict under {param_key!r} (entries: {", ".join(entries)})')
        entries = {param_key: entries[param_key]}
    entries = {name: dict(strip_module_prefix(sd)) for name, sd in entries.items()}
    if target.parent != Path(''):
        target.parent.mkdir(parents=True, exist_ok=True)
    if is_safetensors(target):
        save_safetensors(entries, target)
    else:
        save_atomic(entries, target)
    try:
        arch = detect_arch_type(next(iter(entries.values())))
    except CheckpointError:
        arch = 'not a MambaIR-family network'
    dropped = f'; left out (not state dicts): {", ".join(others)}' if others else ''
    sizes = ', '.join(f'{name} ({len(sd)} tensors)' for name, sd in entries.items())
    return f'{source} -> {target}: {sizes}, {arch}{dropped}'


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-convert``; returns the exit status."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        inputs = [Path(p) for p in args.inputs]
        targets = _targets(inputs, args.output)
        done = skipped = failed = 0
        for source, target in zip(inputs, targets):
            try:
                if target.exists() and not args.overwrite:
                    note(PROG, f'skipped: {target} exists (use --overwrite to replace it) ({source})')
                    skipped += 1
                    continue
                if target.resolve() == source.resolve():
                    raise OptionError('the output is the input file')
                print(f'{PROG}: {convert(source, target, args.param_key)}', flush=True)
                done += 1
            except (MambaIRError, OSError) as exc:  # one file's problem: the others go on
                message = str(exc)
                error(PROG, message, None if str(source) in message else str(source))
                failed += 1
        if failed:
            return EXIT_SOME_FAILED if done or skipped else EXIT_NOTHING_RAN
        return EXIT_OK

    return run_command(PROG, body)


if __name__ == '__main__':
    raise SystemExit(main())
