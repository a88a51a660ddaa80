"""``mambair-restore``: restore your own images (files, folders, globs) with a MambaIR-family checkpoint, on CPU or GPU.

The work is done by :mod:`basicsr_mambair.api`; this module reads and writes the files, shows
progress, and turns every failure into one line ``mambair-restore: error: <what> (<file>)``. A failing
image does not stop the others; the exit status is 0 if all were restored (or skipped), 1 if any failed,
2 for a problem before the first image (options, checkpoint, device).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import basicsr_mambair  # noqa: F401  (before `import basicsr`: torchvision alias; registers the archs)

from ..archs.assm import ROUTING_MODES
from ..errors import ImageError, MambaIRError
from ..image_io import IMAGE_EXTENSIONS, read_image, write_image
from ..utils.files import missing_folders, remove_empty
from .common import EXIT_INTERRUPTED, EXIT_NOTHING_RAN, EXIT_OK, EXIT_SOME_FAILED, error, note

PROG = 'mambair-restore'
EPILOG = """\
examples:
  mambair-restore photos/ -o restored/ --weights MambaIR_SR4.pth
  mambair-restore 'scans/*.png' -o out/ --weights net_g_latest.pth --task CAR_10 --compare
  mambair-restore noisy.png -o out/ --weights realDN.pth --device cuda --half --tile 512

Inputs: image files, folders (their images, not sub-folders) and glob patterns. Outputs are PNG
files <stem>_<suffix>.png in OUTDIR, with the input's bit depth (8 or 16) and channels (gray stays
gray; alpha is passed through, resized for SR). A 1-channel network (CAR) turns colour inputs to gray
(OpenCV luma weights). Denoising and JPEG-artefact networks restore what they are given: nothing is
added to the input.

Without --task/--opt the architecture is inferred from the checkpoint (arch family, embed_dim, depths,
d_state, mlp_ratio, upsampler, upscale, channels; MambaIRv2 also num_heads, window_size, inner_rank,
num_tokens); img_range keeps its default 1.0, as in all official configs. Images whose header claims
more than $MAMBAIR_MAX_PIXELS pixels (default 268 M) are refused before decoding. Tasks: {tasks}.

MambaIRv2 routes every token to a prompt class and scans the tokens sorted by class. --routing
deterministic (the default) takes the most probable class and a stable sort: the same image always gives
the same output. --routing gumbel samples the class with Gumbel noise, as the official code does at test
time too: outputs differ slightly from run to run."""


def build_parser() -> argparse.ArgumentParser:
    from ..presets import preset_names

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Restore images with a MambaIR / MambaIRUNet / MambaIRv2 checkpoint (super-resolution, '
                    'denoising, JPEG artefact reduction) on the CPU or a GPU.',
        epilog=EPILOG.format(tasks=', '.join(preset_names())))
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files, folders or glob patterns')
    parser.add_argument('-o', '--output', required=True, metavar='OUTDIR', help='folder for the results (created)')
    parser.add_argument('--weights', required=True, metavar='PATH',
                        help='checkpoint (.pth or .safetensors): released or trained with BasicSR (params / params_ema '
                             '/ bare state dict)')
    config = parser.add_mutually_exclusive_group()
    config.add_argument('--task', metavar='NAME', help='official preset the checkpoint was trained with')
    config.add_argument('--opt', metavar='YML', help='BasicSR option file whose network_g (and scale) to build')
    parser.add_argument('--param-key', default='params', metavar='KEY',
                        help="checkpoint entry holding the weights, e.g. params_ema (default: params)")
    parser.add_argument('--tile', default='auto', metavar='N|auto',
                        help='tile side in LQ pixels; 0 = whole image; auto (default) = the whole image if it fits '
                             'into the free memory, else the largest tile that does')
    parser.add_argument('--tile-overlap', type=int, default=32, metavar='N',
                        help='LQ pixels shared by neighbouring tiles, blended linearly (default 32)')
    parser.add_argument('--device', default='auto', metavar='auto|cpu|cuda',
                        help='where to run (default auto: CUDA if available); also cuda:N')
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument('--half', action='store_true',
                           help='float16 autocast on CUDA (the selective scan stays float32)')
    precision.add_argument('--bf16', action='store_true',
                           help='bfloat16 autocast, on CUDA or the CPU (the selective scan stays float32)')
    parser.add_argument('--routing', choices=ROUTING_MODES, default=None,
                        help='MambaIRv2 token routing: deterministic (default; the same output on every run) or '
                             'gumbel (the official random routing; outputs vary from run to run)')
    parser.add_argument('--suffix', default=None,
                        help='output name <stem>_<suffix>.png (default: the task, xN for SR, else "restored")')
    parser.add_argument('--compare', action='store_true',
                        help='also write <stem>_<suffix>_compare.png: input (bicubic to the output size) | output')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs (default: skip them)')
    parser.add_argument('--clip', action='store_true',
                        help='clip float images (e.g. float TIFF) to [0, 1] (default: values outside are an error)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars and no summary')
    return parser


def expand_inputs(inputs: Sequence[str], outdir: Path, suffix: str) -> list[str | ImageError]:
    """Files to restore, in the given order; entries that name nothing become :class:`ImageError` items.

    Folders contribute their files with an image extension (sorted, not recursive), minus our own outputs
    when the folder is ``outdir``; glob patterns their matching files; plain paths are taken as they are.
    """
    items: list[str | ImageError] = []
    ours = (f'_{suffix}.png', f'_{suffix}_compare.png')
    for entry in inputs:
        if os.path.isdir(entry):
            is_outdir = Path(entry).resolve() == outdir.resolve()
            names = sorted(n for n in os.listdir(entry) if n.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(entry, n)) and not (is_outdir and n.endswith(ours)))
            if not names:
                items.append(ImageError('no image files in this folder', entry))
            items.extend(os.path.join(entry, n) for n in names)
        elif os.path.exists(entry):
            items.append(entry)
        elif glob.has_magic(entry):
            matches = sorted(m for m in glob.glob(entry) if os.path.isfile(m))
            items.extend(matches or [ImageError('no files match this pattern', entry)])
        else:
            items.append(ImageError('no such file or folder', entry))
    return items


def write_png(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (BGR(A)/gray, uint8/uint16/float) as PNG, atomically: never a partial file under ``path``."""
    if image.dtype == np.float32:  # float inputs (e.g. float TIFF): PNG has no float, keep 16 bits
        image = np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    write_image(path, image)


def _truncated_png(path: Path) -> bool:
    """Whether ``path`` is a PNG that does not decode: a result cut short by a full disk (before results were
    written atomically), to be redone rather than skipped. Any other existing file is the user's: kept."""
    try:
        with open(path, 'rb') as f:
            if f.read(8) != b'\x89PNG\r\n\x1a\n':
                return False
        read_image(path)
    except ImageError:
        return True
    except OSError:
        return False
    return False


def check_writable(folder: Path) -> None:
    """Create ``folder`` and make sure a file can be written in it (``OSError`` otherwise), before any image is
    computed. A real file is tried: permission bits say nothing for root or on a read-only mount."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.mambair-write-test-'):
        pass


def side_by_side(shown_input: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Input resized (bicubic) to the output size | output, in the output's layout."""
    import cv2

    h, w = output.shape[:2]
    left = shown_input
    if left.shape[:2] != (h, w):
        left = cv2.resize(left, (w, h), interpolation=cv2.INTER_CUBIC).reshape(output.shape[:2] + left.shape[2:])
    return np.concatenate([left, output], axis=1)


def _default_suffix(model) -> str:
    if model.task:
        return model.task
    return f'x{model.scale}' if model.scale > 1 else 'restored'


def _parse_tile(value: str) -> int | str:
    if value == 'auto':
        return value
    try:
        tile = int(value)
    except ValueError:
        raise ValueError(f"--tile must be 'auto' or a number of pixels, not {value!r}") from None
    if tile < 0 or 0 < tile < 8:
        raise ValueError(f'--tile must be 0 (whole image) or at least 8 pixels, not {tile}')
    return tile


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``mambair-restore``; returns the exit status."""
    from tqdm import tqdm

    from ..api import load_model, restore_array

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # inputs may come before, between or after the options
    try:
        tile = _parse_tile(args.tile)
        if args.tile_overlap < 0:
            raise ValueError(f'--tile-overlap must be >= 0, not {args.tile_overlap}')
    except ValueError as exc:
        parser.error(str(exc))

    outdir = Path(args.output)
    created = missing_folders(outdir)
    try:
        check_writable(outdir)
    except OSError as exc:
        remove_empty(created)
        error(PROG, f'cannot write to the output folder: {exc.strerror or exc}', str(outdir))
        return EXIT_NOTHING_RAN

    precision = 'fp16' if args.half else 'bf16' if args.bf16 else 'fp32'
    try:
        model = load_model(args.weights, task=args.task, opt=args.opt, device=args.device, precision=precision,
                           param_key=args.param_key, routing=args.routing)
    except (MambaIRError, FileNotFoundError) as exc:
        remove_empty(created)
        error(PROG, str(exc))
        return EXIT_NOTHING_RAN
    except Exception as exc:  # noqa: BLE001  (anything else before the first image: still one line)
        remove_empty(created)
        error(PROG, exc)
        return EXIT_NOTHING_RAN
    suffix = args.suffix if args.suffix is not None else _default_suffix(model)
    items = expand_inputs(args.inputs, outdir, suffix)
    if not args.quiet:
        print(f'{PROG}: {model.describe()}; {sum(isinstance(i, str) for i in items)} images -> {outdir}', flush=True)
    done = skipped = failed = 0
    written: dict[Path, str] = {}
    bar = tqdm(items, desc='images', unit='image', disable=True if args.quiet else None, file=sys.stderr)
    for item in bar:
        try:
            if isinstance(item, ImageError):
                raise item
            path = item
            bar.set_postfix_str(os.path.basename(path))
            target = outdir / f'{Path(path).stem}_{suffix}.png'
            if target in written:
                raise ImageError(f'{target.name} was already written from {written[target]} in this run', path)
            if target.exists() and not args.overwrite:
                if not _truncated_png(target):
                    note(PROG, f'skipped: {target} exists (use --overwrite to replace it) ({path})')
                    skipped += 1
                    continue
                note(PROG, f'redoing {target.name}: the existing file does not decode (truncated?) ({path})')
            image = read_image(path)
            tiles = None

            def progress(n_done: int, total: int) -> None:
                nonlocal tiles
                if total <= 1:
                    return
                if tiles is None:
                    tiles = tqdm(total=total, desc='tiles', unit='tile', leave=False,
                                 disable=True if args.quiet else None, file=sys.stderr)
                tiles.update(n_done - tiles.n)

            try:
                result, shown = restore_array(model, image, tile=tile, tile_overlap=args.tile_overlap, bgr=True,
                                               progress=progress, with_input=args.compare, clip=args.clip)
            finally:
                if tiles is not None:
                    tiles.close()
            write_png(target, result)
            written[target] = path
            if args.compare:
                write_png(target.with_name(f'{target.stem}_compare.png'), side_by_side(shown, result))
            done += 1
        except ImageError as exc:  # the input's own path, or the file the error names
            error(PROG, str(exc), exc.path or item)
            failed += 1
        except OSError as exc:  # full disk, I/O error: nothing was left under the result's name
            error(PROG, f'cannot write {Path(exc.filename or "the result").name}: {exc.strerror or exc}', item)
            failed += 1
        except KeyboardInterrupt:
            bar.close()
            note(PROG, 'interrupted')
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001  (one image's bug must not stop the folder)
            error(PROG, exc, item)
            failed += 1
    bar.close()
    if not done:
        remove_empty(created)  # a run that wrote nothing leaves nothing behind
    if not args.quiet:
        print(f'{PROG}: {done} restored, {skipped} skipped, {failed} failed -> {outdir}', flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
