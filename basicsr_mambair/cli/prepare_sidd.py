"""``mambair-prepare-sidd``: SIDD training patches and validation pairs for the real-denoising recipe.

``train``: every noisy/clean pair of SIDD-Medium sRGB (``Data/<scene>/<id>_NOISY_SRGB_<k>.PNG`` and
``..._GT_SRGB_<k>.PNG``) is cut into overlapping ``patch_size`` squares (official: 512, overlap
128, the last row/column of patches flush with the border) written to ``input_crops/`` and
``target_crops/`` under the same names (optionally also as LMDB).

``val``: the official validation blocks ``ValidationNoisyBlocksSrgb.mat`` /
``ValidationGtBlocksSrgb.mat`` (40 images x 32 blocks of 256x256 RGB) become PNG pairs
``input/<image>_<block>.png`` and ``target/...`` that ``PairedImageDataset`` reads directly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import ToolError
from ..image_io import is_image_file, read_image
from .data_tool import (
    StagedOutput,
    add_common_arguments,
    check_not_input,
    parallel_map,
    run_tool,
    staged_outputs,
    tool_parser,
    write_png,
)
from .make_lmdb import make_lmdb

PROG = 'mambair-prepare-sidd'

NOISY_TAG, GT_TAG = '_NOISY_', '_GT_'
PATCH_NAMES = r'.+_[0-9]{3,}\.png'  # <id>_SRGB_<k>_<patch>.png: what --overwrite replaces (and removes when stale)
BLOCK_NAMES = r'[0-9]{4}_[0-9]{2}\.png'  # <image>_<block>.png of the validation pairs
MAT_KEYS = ('ValidationNoisyBlocksSrgb', 'ValidationGtBlocksSrgb')


def patch_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Patch offsets along one axis: stride ``patch - overlap``, the last patch flush with the end."""
    if length < patch:
        return []
    starts = list(range(0, length - patch, patch - overlap))
    return starts + [length - patch]


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(noisy, clean) files of an SIDD-Medium sRGB ``Data`` folder, matched by name."""
    if not root.is_dir():
        raise ToolError(f'input folder not found: {root}')
    noisy = sorted(p for p in root.rglob('*') if p.is_file() and NOISY_TAG in p.name and is_image_file(p.name))
    if not noisy:
        raise ToolError(f'no *{NOISY_TAG}* images under {root} (expected SIDD-Medium sRGB: Data/<scene>/'
                           f'<id>_NOISY_SRGB_<k>.PNG)')
    pairs = []
    for path in noisy:
        clean = path.with_name(path.name.replace(NOISY_TAG, GT_TAG))
        if not clean.is_file():
            raise ToolError(f'no ground truth for {path}: expected {clean}')
        pairs.append((path, clean))
    return pairs


def crop_pair(pair: tuple[Path, Path], outs: tuple[Path, Path], patch: int, overlap: int) -> int:
    """Write the patches of one pair into ``outs`` (noisy, clean folders); returns how many."""
    noisy_path, clean_path = pair
    noisy, clean = read_image(noisy_path, cv2.IMREAD_UNCHANGED), read_image(clean_path, cv2.IMREAD_UNCHANGED)
    if noisy.shape != clean.shape:
        raise ToolError(f'{noisy_path} and {clean_path} differ in size: {noisy.shape} vs {clean.shape}')
    stem = noisy_path.stem.replace(NOISY_TAG, '_')
    count = 0
    for top in patch_starts(noisy.shape[0], patch, overlap):
        for left in patch_starts(noisy.shape[1], patch, overlap):
            count += 1
            name = f'{stem}_{count:03d}.png'
            write_png(outs[0] / name, noisy[top:top + patch, left:left + patch])
            write_png(outs[1] / name, clean[top:top + patch, left:left + patch])
    return count


def prepare_train(src: Path, out: Path, patch: int = 512, overlap: int = 128, workers: int = 1,
                  lmdb: bool = False, overwrite: bool = False) -> int:
    """Crop every SIDD-Medium pair under ``src`` into ``out/{input,target}_crops``; returns the patch count."""
    if not 0 <= overlap < patch:
        raise ToolError(f'--overlap must be in [0, patch size), got {overlap}')
    pairs = find_pairs(src)
    subs = ('input_crops', 'target_crops')
    folders = [out / sub for sub in subs] + ([out / f'{sub}.lmdb' for sub in subs] if lmdb else [])
    check_not_input([out, *folders], [src, *(p for pair in pairs for p in pair)])
    if lmdb and not overwrite:  # refuse before cropping, not after
        for folder in folders[2:]:
            if folder.exists():
                raise ToolError(f'output {folder} already exists (use --overwrite to replace it)')
    staged = [StagedOutput(out / sub, overwrite, PATCH_NAMES, remove_stale=True) for sub in subs]
    with staged_outputs(staged) as (noisy_dir, clean_dir):
        work = partial(crop_pair, outs=(noisy_dir, clean_dir), patch=patch, overlap=overlap)
        total = sum(parallel_map(work, pairs, workers, desc='SIDD patches'))
    if lmdb:
        for sub in subs:
            make_lmdb(out / sub, out / f'{sub}.lmdb', workers=workers, overwrite=overwrite)
    return total


def prepare_val(src: Path, out: Path, overwrite: bool = False) -> int:
    """Turn the two official validation ``.mat`` files in ``src`` into PNG pairs; returns the pair count."""
    from scipy.io import loadmat

    mats = [src / f'{key}.mat' for key in MAT_KEYS]
    check_not_input([out, out / 'input', out / 'target'], [src, *mats])
    blocks = []
    for key, path in zip(MAT_KEYS, mats):
        if not path.is_file():
            raise ToolError(f'{path} not found (download the SIDD validation blocks, see datasets/README.md)')
        try:
            data = loadmat(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise ToolError(f'cannot read {path}: {e}') from None
        if key not in data:
            found = sorted(k for k in data if not k.startswith('__'))
            raise ToolError(f"{path} has no variable '{key}' (found: {', '.join(found) or 'none'})")
        array = np.asarray(data[key])
        if array.ndim != 5 or array.shape[-1] != 3:
            raise ToolError(f"{path}: '{key}' must be (images, blocks, H, W, 3), got {array.shape}")
        blocks.append(array)
    noisy, clean = blocks
    if noisy.shape != clean.shape:
        raise ToolError(f'noisy and clean blocks differ in shape: {noisy.shape} vs {clean.shape}')
    staged = [StagedOutput(out / sub, overwrite, BLOCK_NAMES, remove_stale=True) for sub in ('input', 'target')]
    n_img, n_blk = noisy.shape[:2]
    with staged_outputs(staged) as (noisy_dir, clean_dir):
        for i in tqdm(range(n_img), unit='image', desc='SIDD validation'):
            for j in range(n_blk):
                name = f'{i:04d}_{j:02d}.png'
                write_png(noisy_dir / name, cv2.cvtColor(noisy[i, j].astype(np.uint8), cv2.COLOR_RGB2BGR))
                write_png(clean_dir / name, cv2.cvtColor(clean[i, j].astype(np.uint8), cv2.COLOR_RGB2BGR))
    return n_img * n_blk


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__.split('\n\n', 1)[1], ['train SIDD_Medium_Srgb/Data datasets/SIDD/train -j 8',
                                                             'val path/with/mat/files datasets/SIDD/val'])
    sub = parser.add_subparsers(dest='command', required=True)
    train = sub.add_parser('train', help='crop SIDD-Medium sRGB pairs into overlapping patches')
    train.add_argument('input', type=Path, help='SIDD_Medium_Srgb/Data (one folder per scene)')
    train.add_argument('output', type=Path, help='folder for input_crops/ and target_crops/')
    train.add_argument('--patch-size', type=int, default=512, help='patch side in pixels (default 512)')
    train.add_argument('--overlap', type=int, default=128, help='overlap of neighbouring patches (default 128)')
    train.add_argument('--lmdb', action='store_true', help='also write input_crops.lmdb / target_crops.lmdb')
    add_common_arguments(train, overwrite_help='replace the patches (and LMDBs) of an earlier run once the new ones '
                         'are complete (other files are kept)')
    val = sub.add_parser('val', help='convert the validation .mat blocks into PNG pairs')
    val.add_argument('input', type=Path,
                     help='folder with ValidationNoisyBlocksSrgb.mat and ValidationGtBlocksSrgb.mat')
    val.add_argument('output', type=Path, help='folder for input/ and target/')
    val.add_argument('--overwrite', action='store_true',
                     help='replace the pairs of an earlier run once the new ones are complete (other files are kept)')
    return parser


def _work(args: argparse.Namespace) -> str:
    if args.command == 'train':
        n = prepare_train(args.input, args.output, args.patch_size, args.overlap, args.workers, args.lmdb,
                          args.overwrite)
        return f'wrote {n} patch pairs to {args.output}'
    n = prepare_val(args.input, args.output, args.overwrite)
    return f'wrote {n} validation pairs to {args.output}'


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(PROG, _work, build_parser(), argv)


if __name__ == '__main__':
    sys.exit(main())
