"""``mambair-export``: a MambaIR / MambaIRUNet checkpoint to an ONNX file of standard operators.

The work is :func:`basicsr_mambair.deploy.export_onnx`; this module parses the command line and turns every
failure into one line ``mambair-export: error: <what>``. Exit status: 0 exported (and checked), 1 the
``--check`` failed (nothing written), 2 nothing exported (bad arguments, checkpoint, missing packages, an
export failure).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import basicsr_mambair  # noqa: F401  (before `import basicsr`: torchvision alias; registers the archs)

from ..errors import CheckFailed, CheckpointError, MambaIRError, RestoreError
from .common import EXIT_INTERRUPTED, EXIT_NOTHING_RAN, EXIT_OK, EXIT_SOME_FAILED, error

PROG = 'mambair-export'
EPILOG = """\
examples:
  mambair-export MambaIR_lightSR_x2.pth -o lightSR_x2.onnx --check Set5/LR_bicubic/X2/babyx2.png
  mambair-export net_g_latest.pth --task CAR_10 --size 256x256 -o car10_256.onnx
  mambair-export realDN.pth --fp16 -o realDN_fp16.onnx --check noisy.png --provider cuda

The graph: input "input", float32 (batch, C, H, W) in [0, 1], RGB (gray for CAR networks); output
"output", float32 (batch, C, scale*H, scale*W), not clamped. The selective scan is expressed with
standard ONNX operators (three Scan loops over chunks of the H*W sequence): no custom op, nothing to
register in the runtime.

Size: dynamic by default (any H and W; MambaIRUNet needs sides of at least 5 pixels and pads to multiples
of 8 inside the graph); --size HxW fixes it (the batch stays dynamic). --fp16 stores weights and
activations in half precision for GPUs (input/output stay float32; the selective scan and its inputs
stay float32).

--check IMAGE runs the graph with onnxruntime on the image (center-cropped to a fixed size) and compares
it with PyTorch: the largest absolute difference must be within the tolerance (1e-4 fp32, 1e-2 fp16), or
nothing is written and the exit status is 1. Without --task/--opt the network is inferred from the
checkpoint, as in mambair-restore. Tasks: {tasks}."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``mambair-export: error: ...``), no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
    from ..presets import preset_names

    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description='Export a MambaIR / MambaIRUNet checkpoint to ONNX (standard operators only), '
                                 'optionally checked with onnxruntime against PyTorch on a real image.',
                     epilog=EPILOG.format(tasks=', '.join(preset_names())))
    parser.add_argument('checkpoint', metavar='CHECKPOINT',
                        help='weights: released or trained with BasicSR (params / params_ema / bare state dict)')
    parser.add_argument('-o', '--output', metavar='FILE.onnx', help='where to write (default: <checkpoint stem>.onnx)')
    config = parser.add_mutually_exclusive_group()
    config.add_argument('--task', metavar='NAME', help='official preset the checkpoint was trained with')
    config.add_argument('--opt', metavar='YML', help='BasicSR option file whose network_g to build')
    parser.add_argument('--param-key', default='params', metavar='KEY',
                        help='checkpoint entry holding the weights, e.g. params_ema (default: params)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--dynamic', action='store_true', help='any input size (the default)')
    size.add_argument('--size', metavar='HxW', help='a fixed input size, e.g. 256x256 (or 256)')
    parser.add_argument('--fp16', action='store_true',
                        help='half-precision weights and activations (for GPUs); the selective scan stays float32')
    parser.add_argument('--opset', type=int, metavar='N',
                        help='ONNX opset: 17-20 with the torchscript exporter (default 17), 18-23 with dynamo '
                             '(default 18)')
    parser.add_argument('--exporter', default='auto', choices=('auto', 'torchscript', 'dynamo'),
                        help="torch's exporter (default auto: torchscript where torch still has it, it is "
                             "about 10x faster)")
    parser.add_argument('--check', metavar='IMAGE', help='compare onnxruntime with PyTorch on this image')
    parser.add_argument('--tolerance', type=float, metavar='X',
                        help='largest allowed absolute difference of --check (default 1e-4, fp16 1e-2)')
    parser.add_argument('--provider', default='cpu', choices=('cpu', 'cuda'),
                        help='onnxruntime provider of --check (cuda needs onnxruntime-gpu)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.add_argument('--quiet', action='store_true', help='print nothing but errors')
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192); '256' -> (256, 256); ValueError with a readable message otherwise."""
    parts = text.lower().replace('*', 'x').split('x')
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f'--size must be HxW with positive integers, e.g. 256x256; got {text!r}')
    return values[0], values[1]


def _error(message: str | BaseException) -> None:
    error(PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-export``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, its one line already printed)
        return int(exc.code or 0)
    try:
        size = parse_size(args.size) if args.size else None
        if args.tolerance is not None and not args.tolerance > 0:
            raise ValueError(f'--tolerance must be positive, got {args.tolerance}')
    except ValueError as exc:
        _error(exc)
        return EXIT_NOTHING_RAN
    output = Path(args.output) if args.output else Path(Path(args.checkpoint).stem + '.onnx')

    from ..deploy import export_onnx

    try:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f'no such checkpoint file: {args.checkpoint}')
        if output.parent != Path('') and not output.parent.is_dir():
            raise FileNotFoundError(f'the output folder does not exist: {output.parent}')
        result = export_onnx(args.checkpoint, output, size=size, fp16=args.fp16, opset=args.opset,
                             exporter=args.exporter, task=args.task, opt=args.opt, param_key=args.param_key,
                             overwrite=args.overwrite, check_image=args.check, tolerance=args.tolerance,
                             provider=args.provider)
    except CheckFailed as exc:
        _error(f'{exc}; nothing written')
        return EXIT_SOME_FAILED
    except FileExistsError as exc:
        _error(f'{exc} (use --overwrite to replace it)')
        return EXIT_NOTHING_RAN
    except (CheckpointError, RestoreError) as exc:  # the checkpoint does not fit (or is no MambaIR network)
        _error(f'{exc} ({args.checkpoint})')
        return EXIT_NOTHING_RAN
    except (MambaIRError, FileNotFoundError) as exc:
        _error(exc)
        return EXIT_NOTHING_RAN
    except OSError as exc:
        _error(f'cannot write {output}: {exc.strerror or exc}')
        return EXIT_NOTHING_RAN
    except KeyboardInterrupt:
        _error('interrupted; nothing written')
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  (anything unforeseen: still one line, nothing written)
        _error(exc)
        return EXIT_NOTHING_RAN
    if not args.quiet:
        print(f'{PROG}: {result.describe()}', flush=True)
        if result.check is not None:
            print(f'{PROG}: {result.check.describe()}', flush=True)
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
