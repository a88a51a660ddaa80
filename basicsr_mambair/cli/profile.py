"""``mambair-profile``: parameters and multiply-adds of a preset, a checkpoint or an option file's network.

The counting is :mod:`basicsr_mambair.profile` (a forward on the meta device, the selective scan included);
this module parses the command line and prints one table per network (or JSON).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any

import basicsr_mambair  # noqa: F401  (before `import basicsr`: torchvision alias; registers the archs)

from ..errors import OptionError
from .common import EXIT_OK, run_command

PROG = 'mambair-profile'
PAPER_OUTPUT = (720, 1280)  # the MambaIRv2 paper's MACs: HR 1280 x 720, input (720 // s) x (1280 // s)
EPILOG = """\
examples:
  mambair-profile --task lightSR_x2                    # the MambaIRv2 paper's convention: HR output 720x1280
  mambair-profile --task all --input 64x64             # every official preset on a 64x64 input
  mambair-profile --weights net_g_latest.pth --output 1080x1920
  mambair-profile --opt options/train/train_MambaIR_SR_x2.yml --json

Columns (multiply-adds, G = 1e9): "no scan" = convolutions, matrix products (linear layers, projections,
attention), norms, pooling, upsampling, counted as fvcore counts them (what module- or graph-tracing tools
report for a Mamba network); "scan" = the selective scan by our count (per step and state: dt*A, (dt*u)*B, the
state's multiply-add, the output contraction C*h; plus dt*u, D*u, the gate); "total" = the two; "published"
= "no scan" plus the scan counted as 9*B*L*D*N + B*L*D (VMamba's formula, which the official MambaIR
analysis script uses: the MACs of the MambaIRv2 paper). Rows are the network's top-level parts, so the body
("layers" ...) and the whole network can be read side by side. Tasks: {tasks}."""


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r'\s*(\d+)\s*[xX,]\s*(\d+)\s*', text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f'expected HEIGHTxWIDTH in pixels, e.g. 720x1280, not {text!r}')
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    from ..presets import preset_names

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Parameters and multiply-adds (MACs) of MambaIR-family networks at a given input size, the '
                    'selective scan included.',
        epilog=EPILOG.format(tasks=', '.join(preset_names())))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--task', nargs='+', metavar='NAME', help="official presets, or 'all'")
    source.add_argument('--weights', metavar='PATH', help='a checkpoint (.pth or .safetensors): its inferred network')
    source.add_argument('--opt', metavar='YML', help='a BasicSR option file: its network_g')
    parser.add_argument('--param-key', default='params', metavar='KEY', help='checkpoint entry (default: params)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--output', type=_size, metavar='HxW',
                      help='output (HR) size; the input is (H // scale) x (W // scale) (default: 720x1280)')
    size.add_argument('--input', type=_size, metavar='HxW', help='input (LR) size instead')
    parser.add_argument('--json', action='store_true', help='print JSON (exact integers) instead of tables')
    return parser


def _networks(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, arch type, constructor arguments) of each network to profile."""
    from ..presets import get_preset, matching_presets, preset_names

    if args.task:
        names = preset_names() if args.task == ['all'] else args.task
        networks = []
        for name in names:
            try:
                preset = get_preset(name)
            except KeyError as exc:
                raise OptionError(exc.args[0]) from None
            networks.append((preset.name, preset.arch_type, preset.kwargs))
        return networks
    if args.weights:
        from ..archs.support import infer_config
        from ..utils.checkpoint import read_state_dict

        arch_type, kwargs = infer_config(read_state_dict(args.weights, param_key=args.param_key))
        presets = matching_presets(arch_type, kwargs)
        return [(args.weights + (f' ({"/".join(presets)})' if presets else ''), arch_type, kwargs)]
    from ..options import read_option_file

    network = dict(read_option_file(args.opt).get('network_g') or {})
    if 'type' not in network:
        raise OptionError(f'{args.opt} has no network_g with a type')
    arch_type = network.pop('type')
    network.pop('compile', None)  # a training option, not the arch's
    return [(args.opt, arch_type, network)]


def _input_size(args: argparse.Namespace, scale: int) -> tuple[int, int]:
    if args.input:
        return args.input
    h, w = args.output or PAPER_OUTPUT
    if h < scale or w < scale:
        raise OptionError(f'--output {h}x{w} is smaller than the scale {scale}')
    return h // scale, w // scale


def _giga(n: int) -> str:
    return f'{n / 1e9:.3f}'


def format_table(label: str, arch_type: str, prof) -> str:
    """The human-readable report of one :class:`~basicsr_mambair.profile.Profile`."""
    c, h, w = prof.input_shape
    oc, oh, ow = prof.output_shape
    lines = [f'{label}: {arch_type}, {prof.params:,} parameters; input {c}x{h}x{w} -> output {oc}x{oh}x{ow}',
             f'{"part (MACs, G)":<22}{"no scan":>12}{"scan":>12}{"total":>12}{"published":>12}']
    for part in [*prof.parts, None]:
        lines.append(f'{part or "total":<22}{_giga(prof.without_scan(part)):>12}{_giga(prof.scan(part)):>12}'
                     f'{_giga(prof.total(part)):>12}{_giga(prof.published(part)):>12}')
    by_category = ', '.join(f'{k} {_giga(v)}' for k, v in prof.by_category().items() if v)
    exps = sum(prof.scan_exp.values())
    lines.append(f'by operation (G): {by_category}; selective scan: {prof.scan_calls} calls, {_giga(exps)} G exp')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-profile``; returns the exit status."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        from ..archs.support import describe
        from ..profile import profile_config

        results = []
        for label, arch_type, kwargs in _networks(args):
            try:
                info = describe(arch_type, kwargs)
            except KeyError as exc:
                raise OptionError(exc.args[0]) from None
            prof = profile_config(arch_type, kwargs, _input_size(args, info.scale))
            if args.json:
                results.append({'name': label, 'arch_type': arch_type, **prof.as_dict()})
            else:
                print(format_table(label, arch_type, prof) + '\n', flush=True)
        if args.json:
            print(json.dumps(results, indent=1))
        return EXIT_OK

    return run_command(PROG, body)


if __name__ == '__main__':
    raise SystemExit(main())
