"""The smaller cases of issue 16 (item 6): image headers checked before decoding, alpha with 1-channel networks,
the API's arguments and float range, networks too narrow to work, an unwritable output folder."""

from __future__ import annotations

import os
import struct
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import arch_class, cli_command, mount_namespace, run_cli, shell_words, tiny_checkpoint
from PIL import Image

from basicsr_mambair.api import load_model, restore
from basicsr_mambair.cli import extract_subimages, make_jpeg, make_lmdb, make_lr
from basicsr_mambair.cli import restore as restore_cli
from basicsr_mambair.errors import ImageError, RestoreError


def png_header_only(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def gray_weights(tmp_path_factory) -> Path:
    """A 1-channel denoising/CAR-style network (x1)."""
    return tiny_checkpoint(tmp_path_factory.mktemp('w') / 'gray.pth', in_chans=1, upscale=1, upsampler='')


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp('w') / 'x2.pth')


def test_image_headers_are_checked_before_decoding(tmp_path: Path, shared_data: Path, weights: Path, capfd,
                                                   monkeypatch) -> None:
    """A 65-byte PNG claiming 100000x100000: a cv2.error traceback in the four data tools and OpenCV's raw text
    in restore before; now one line naming the file and the limit (MAMBAIR_MAX_PIXELS)."""
    folder = tmp_path / 'in'
    folder.mkdir()
    (folder / 'bomb.png').write_bytes(png_header_only(100000, 100000))
    runs = [(make_lr, ['-s', '2']), (make_jpeg, []), (extract_subimages, []), (make_lmdb, [])]
    for k, (tool, extra) in enumerate(runs):
        out = tmp_path / (f'o{k}.lmdb' if tool is make_lmdb else f'o{k}')
        assert tool.main([str(folder), str(out), *extra, '-j', '1']) == 2
        err = capfd.readouterr().err
        last = err.strip().splitlines()[-1]
        assert 'Traceback' not in err and 'cv2.error' not in err and 'OpenCV(' not in err, err
        assert 'image too large: its header says 100000x100000' in last and 'bomb.png' in last, last
        assert 'MAMBAIR_MAX_PIXELS' in last
    assert restore_cli.main([str(folder / 'bomb.png'), '-o', str(tmp_path / 'r'), '--weights', str(weights)]) == 1
    err = capfd.readouterr().err
    assert 'image too large' in err and 'OpenCV(' not in err and 'Traceback' not in err

    # the limit is configurable: a real 512x512 image over a limit of 100000 pixels
    monkeypatch.setenv('MAMBAIR_MAX_PIXELS', '1e5')
    big = tmp_path / 'big'
    big.mkdir()
    (big / 'baby.png').write_bytes((shared_data / 'Set5' / 'HR' / 'baby.png').read_bytes())
    assert make_lr.main([str(big), str(tmp_path / 'o9'), '-s', '2', '-j', '1']) == 2
    assert 'its header says 512x512' in capfd.readouterr().err
    monkeypatch.setenv('MAMBAIR_MAX_PIXELS', '262144')
    assert make_lr.main([str(big), str(tmp_path / 'o9'), '-s', '2', '-j', '1']) == 0


def test_alpha_with_a_one_channel_network(tmp_path: Path, gray_weights: Path, shared_data: Path) -> None:
    """RGBA or gray+alpha through a 1-channel network (CAR): computed, then never written before; now a PNG of
    the gray result (in B, G and R) with the input's alpha."""
    colour = cv2.imread(str(shared_data / 'CBSD68' / '101085.png'))[100:120, 100:116]
    alpha = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (20, 1))
    folder = tmp_path / 'in'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'rgba.png'), np.dstack([colour, alpha]))
    gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    Image.fromarray(np.dstack([gray, alpha]), 'LA').save(folder / 'la.png')
    proc = run_cli('mambair-restore', str(folder), '-o', str(tmp_path / 'out'), '--weights', str(gray_weights),
                   cwd=tmp_path, check=False)
    assert proc.returncode == 0 and '2 restored, 0 skipped, 0 failed' in proc.stdout, proc.stderr
    model = load_model(gray_weights)
    for name, source in (('rgba', np.dstack([colour, alpha])), ('la', np.dstack([gray, alpha]))):
        result = cv2.imread(str(tmp_path / 'out' / f'{name}_restored.png'), cv2.IMREAD_UNCHANGED)
        assert result.shape == (20, 16, 4) and np.array_equal(result[..., 3], alpha)
        assert np.array_equal(result[..., 0], result[..., 1]) and np.array_equal(result[..., 1], result[..., 2])
        expected = restore(model, source[..., [2, 1, 0, 3]] if name == 'rgba' else source, tile=0)
        assert np.array_equal(result[..., 0], expected[..., 0])  # the network's gray result


def test_api_arguments_are_checked(weights: Path) -> None:
    """``tile_batch=0``, ``tile='abc'`` and a negative overlap gave raw Python errors or were accepted."""
    model = load_model(weights)
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    bad = [(dict(tile='abc'), "tile must be 'auto'"), (dict(tile=-1), 'tile must be'), (dict(tile=2.5), 'tile must'),
           (dict(tile=True), 'tile must'), (dict(tile_overlap=-1), 'tile_overlap must be a number of pixels >= 0'),
           (dict(tile_overlap='8'), 'tile_overlap must'), (dict(tile_batch=0), 'tile_batch must be a number of '
                                                                                'tiles >= 1'),
           (dict(tile_batch=1.5), 'tile_batch must')]
    for kwargs, message in bad:
        with pytest.raises(RestoreError, match=message):
            restore(model, image, **kwargs)
    whole = restore(model, image, tile=0)
    for kwargs in (dict(tile=None), dict(tile='auto'), dict(tile=np.int64(24), tile_batch=2)):
        assert np.array_equal(restore(model, image, **kwargs), whole), kwargs
    assert restore(model, image, tile=16, tile_overlap=0, tile_batch=3).shape == whole.shape


def test_float_input_outside_unit_range_is_an_error_unless_clipped(weights: Path, tmp_path: Path, capsys) -> None:
    model = load_model(weights)
    rgb = np.random.default_rng(1).random((20, 24, 3), dtype=np.float32)
    over = rgb * 1.5 - 0.1
    with pytest.raises(ImageError, match=r'float pixel values must lie in \[0, 1\], these span \[-0.09'):
        restore(model, over)
    assert np.array_equal(restore(model, over, clip=True), restore(model, np.clip(over, 0, 1)))
    folder = tmp_path / 'in'
    folder.mkdir()
    assert cv2.imwrite(str(folder / 'hdr.tif'), over)
    args = [str(folder), '-o', str(tmp_path / 'out'), '--weights', str(weights)]
    assert restore_cli.main(args) == 1
    assert 'must lie in [0, 1]' in capsys.readouterr().err and not (tmp_path / 'out').exists()
    assert restore_cli.main([*args, '--clip']) == 0
    assert cv2.imread(str(tmp_path / 'out' / 'hdr_x2.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint16


@pytest.mark.parametrize(('arch', 'kwargs', 'message'), [
    ('MambaIR', dict(embed_dim=20, depths=[1]), 'MambaIR needs embed_dim >= 30'),
    ('MambaIR', dict(embed_dim=29, depths=[1], upsampler='pixelshuffledirect'), 'MambaIR needs embed_dim >= 30'),
    ('MambaIRUNet', dict(dim=16, num_blocks=[1, 1, 1, 1]), 'MambaIRUNet needs an even dim >= 30'),
    ('MambaIRUNet', dict(dim=31, num_blocks=[1, 1, 1, 1]), 'MambaIRUNet needs an even dim >= 30'),
    ('MambaIRv2', dict(embed_dim=6, depths=[1], num_heads=[4], window_size=4, inner_rank=8, num_tokens=8),
     'embed_dim must be a multiple of num_heads'),
])
def test_networks_too_narrow_to_work_are_refused_at_construction(arch: str, kwargs: dict, message: str) -> None:
    """They built, then failed on every image with a shape error."""
    with pytest.raises(ValueError, match=message) as info:
        arch_class(arch)(**kwargs)
    assert '\n' not in str(info.value)


def test_narrow_network_in_options_is_one_line(weights: Path) -> None:
    opt = {'network_g': {'type': 'MambaIR', 'embed_dim': 20, 'depths': [1], 'upscale': 2}}
    with pytest.raises(RestoreError, match='cannot build MambaIR from network_g: MambaIR needs embed_dim >= 30'):
        load_model(torch.load(weights, weights_only=True), opt=opt)


def test_unwritable_output_folder_is_found_before_any_image(tmp_path: Path, weights: Path, shared_data: Path) -> None:
    """Every image was computed before each write failed; now the folder is tried first (one line, exit 2)."""
    folder = tmp_path / 'in'
    folder.mkdir()
    for k in range(3):
        (folder / f'{k}.png').write_bytes((shared_data / 'Set5' / 'LR_bicubic' / 'X4' / 'birdx4.png').read_bytes())
    args = [str(folder), '-o', str(tmp_path / 'ro' / 'out'), '--weights', str(weights)]
    if os.geteuid() != 0:  # permission bits bind everyone but root
        (tmp_path / 'ro').mkdir(mode=0o555)
        proc = run_cli('mambair-restore', *args, cwd=tmp_path, check=False)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:  # root writes anywhere but on a read-only file system
        (tmp_path / 'ro').mkdir()
        script = textwrap.dedent(f'''\
            mount -t tmpfs -o ro,size=1m tmpfs {tmp_path / 'ro'} || exit 99
            {shell_words([*cli_command('mambair-restore'), *args])} > run.out 2> run.err; echo $? > run.rc
            ''')
        proc = mount_namespace()(script, tmp_path)
        assert proc.returncode == 0, proc.stderr
        rc = int((tmp_path / 'run.rc').read_text())
        out, err = (tmp_path / 'run.out').read_text(), (tmp_path / 'run.err').read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('mambair-restore: error: cannot write to the output folder: ') and 'out' in lines[0]
    assert 'images ->' not in out  # stopped before the model was even loaded
