"""`mambair-demo` end to end (the README's main job), and tiled inference with the model it trains."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from helpers import run_cli

from basicsr_mambair.cli.demo import NETWORK, VAL_PHOTOS
from basicsr_mambair.tiling import forward_tiled, tile_starts
from basicsr_mambair.utils.checkpoint import read_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """Run the demo exactly as `make demo` does (default settings) in a fresh folder."""
    cwd = tmp_path_factory.mktemp('demo')
    proc = run_cli('mambair-demo', cwd=cwd, timeout=1200)
    return cwd / 'demo', proc


def test_demo_trains_and_beats_bicubic(demo_run):
    work, proc = demo_run
    rows = dict(re.findall(r'^\| (MambaIR \(demo.*?\)|bicubic) \| ([\d.]+) \|', proc.stdout, flags=re.M))
    ours = next(float(v) for k, v in rows.items() if k.startswith('MambaIR'))
    assert ours > float(rows['bicubic']), proc.stdout[-2000:]
    exp = work / 'experiments' / 'demo_MambaIR_lightSR_x2'
    log = next(exp.glob('train_*.log')).read_text()
    assert log.count('Validation skimage_val') >= 4  # periodic validation
    assert (exp / 'models' / 'net_g_latest.pth').is_file() and list(exp.glob('training_states/*.state'))
    assert list((work / 'tb_logger' / 'demo_MambaIR_lightSR_x2').glob('events.out.tfevents.*'))
    assert len(list((work / 'results' / 'demo_MambaIR_lightSR_x2' / 'visualization').rglob('*.png'))) == 2

    again = run_cli('mambair-demo', cwd=work.parent, check=False)  # never overwrites a finished demo
    assert again.returncode == 2 and 'use --overwrite' in again.stderr


def _border_and_other_jumps(img: torch.Tensor, starts: list[int], tile: int, scale: int) -> tuple[float, float]:
    """Mean |difference| of horizontally neighbouring pixels across tile borders, and across all other columns."""
    jumps = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # boundary c: between columns c and c+1
    borders = sorted({s * scale - 1 for s in starts[1:]} | {(s + tile) * scale - 1 for s in starts[:-1]})
    other = torch.ones_like(jumps, dtype=torch.bool)
    other[borders] = False
    return jumps[borders].mean().item(), jumps[other].mean().item()


def test_small_tiles_leave_no_seams_on_a_real_image(demo_run):
    """Seams are jumps that tiling adds: measured on the tiling error (tiled - whole image) of a real photo."""
    work, _ = demo_run
    net = ARCH_REGISTRY.get('MambaIR')(**{k: v for k, v in NETWORK.items() if k != 'type'}).eval()
    net.load_state_dict(read_state_dict(work / 'experiments' / 'demo_MambaIR_lightSR_x2' / 'models' /
                                        'net_g_latest.pth'))
    lq = cv2.imread(str(work / 'data' / 'val' / 'LR_bicubic' / 'X2' / f'{VAL_PHOTOS[0]}x2.png'))
    x = torch.from_numpy(np.ascontiguousarray(lq[:96, :160, ::-1]) / 255.0).permute(2, 0, 1)[None].float()
    tile, scale = 40, 2
    with torch.no_grad():
        whole = net(x)

    blended = forward_tiled(net, x, scale, tile=tile, overlap=8)
    assert blended.shape == whole.shape == (1, 3, 192, 320)
    across, other = _border_and_other_jumps(blended - whole, tile_starts(160, tile, 8), tile, scale)
    # as elsewhere, up to the variation of the tiling error itself (pasted tiles below: several times larger)
    assert across <= 1.25 * other, (across, other)
    seen, expected = (_border_and_other_jumps(img, tile_starts(160, tile, 8), tile, scale)[0]
                      for img in (blended, whole))
    assert abs(seen - expected) <= 0.01 * expected  # the picture itself: borders look as without tiles
    assert (blended - whole).abs().mean() < 0.5 / 255

    # the measure does see seams: tiles pasted side by side without overlap have them
    pasted = forward_tiled(net, x, scale, tile=tile, overlap=0)
    across, other = _border_and_other_jumps(pasted - whole, tile_starts(160, tile, 0), tile, scale)
    assert across > 3 * other
