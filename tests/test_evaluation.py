"""Evaluation: the bicubic baseline through our pipeline, tiled and self-ensemble inference, result tables."""

from __future__ import annotations

import csv

import cv2
import pytest
import torch
from basicsr.archs import build_network
from helpers import run_cli
from tiny_experiments import load_options, write_options

from basicsr_mambair.tiling import forward_official_tiles, forward_self_ensemble, forward_tiled, tile_starts

# BasicSR's calculate_psnr/ssim on ../shared/data, MATLAB-bicubic upsampling (shared/data/README.md)
BICUBIC_REFERENCE = {
    ('Set5', 2): (33.6779, 0.93042), ('Set5', 3): (30.4043, 0.86895), ('Set5', 4): (28.4305, 0.81126),
    ('Set14', 2): (30.3274, 0.86997), ('Set14', 3): (27.6324, 0.77595), ('Set14', 4): (26.0899, 0.70491),
}


def bicubic_test_options(data, scale: int) -> dict:
    def dataset(name: str) -> dict:
        return dict(name=name, type='PairedImageDataset', dataroot_gt=str(data / name / 'HR'),
                    dataroot_lq=str(data / name / 'LR_bicubic' / f'X{scale}'), filename_tmpl=f'{{}}x{scale}',
                    io_backend=dict(type='disk'))

    return dict(
        name=f'bicubic_x{scale}', model_type='MambaIRModel', scale=scale, num_gpu='auto', manual_seed=0,
        datasets=dict(test_1=dataset('Set5'), test_2=dataset('Set14')),
        network_g=dict(type='Bicubic', upscale=scale),
        path=dict(pretrain_network_g=None, strict_load_g=True),
        val=dict(save_img=False, suffix=None, tile=0,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=scale, test_y_channel=True),
                              ssim=dict(type='calculate_ssim', crop_border=scale, test_y_channel=True))))


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_bicubic_baseline_matches_basicsr_metrics(tmp_path, shared_data, scale):
    opt_file = write_options(tmp_path / 'bicubic.yml', bicubic_test_options(shared_data, scale))
    proc = run_cli('mambair-test', '-opt', str(opt_file), cwd=tmp_path)
    results = tmp_path / 'results' / f'bicubic_x{scale}'
    with open(results / 'results.csv') as f:
        rows = {row['dataset']: row for row in csv.DictReader(f)}
    for name in ('Set5', 'Set14'):
        psnr, ssim = BICUBIC_REFERENCE[(name, scale)]
        assert abs(float(rows[name]['psnr']) - psnr) < 0.005, (name, rows[name])
        assert abs(float(rows[name]['ssim']) - ssim) < 0.0005, (name, rows[name])
    assert int(rows['Set5']['images']) == 5 and int(rows['Set14']['images']) == 14
    with open(results / 'per_image.csv') as f:
        assert len(list(csv.DictReader(f))) == 19
    assert '| Set5 | 5 |' in (results / 'results.md').read_text()
    assert '| Set14 | 14 |' in proc.stderr + proc.stdout  # the table is printed at the end


class _Shift(torch.nn.Module):
    """A tiny position-dependent SR network: output depends on the neighbourhood (3x3 conv) and upsamples."""

    def __init__(self, scale: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        self.shuffle = torch.nn.PixelShuffle(scale)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(50, 64, 8) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 24 for a, b in zip(starts, starts[1:]))


def test_tile_larger_than_image_is_whole_image_exactly():
    net, x = _Shift(2).eval(), torch.rand(2, 3, 37, 45)
    with torch.no_grad():
        whole = net(x)
    assert torch.equal(forward_tiled(net, x, 2, tile=64, overlap=16), whole)
    assert torch.equal(forward_official_tiles(net, x, 2), whole)  # < 200 px: one official tile


def test_small_tiles_have_right_size_and_agree_with_whole_image_away_from_borders():
    net, x = _Shift(2).eval(), torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        whole = net(x)
    for batch in (1, 3):
        tiled = forward_tiled(net, x, 2, tile=24, overlap=8, tile_batch=batch)
        assert tiled.shape == whole.shape
        # a 3x3 conv only differs from the whole image within 1 LQ pixel of a tile edge; blending over
        # 8-pixel overlaps weights those pixels down, so the error stays small everywhere
        assert (tiled - whole).abs().max() < 0.2 * whole.abs().max()
    big = torch.rand(1, 3, 450, 230)
    with torch.no_grad():
        official = forward_official_tiles(net, big, 2)
    assert official.shape == (1, 3, 900, 460)


def test_self_ensemble_is_mean_of_eight_transformed_forwards():
    net, x = _Shift(2).eval(), torch.rand(1, 3, 9, 13)
    expected = []
    with torch.no_grad():
        for flip in (False, True):
            for rot in range(4):
                t = x.flip(-1) if flip else x
                y = net(torch.rot90(t, rot, (-2, -1)))
                y = torch.rot90(y, -rot, (-2, -1))
                expected.append(y.flip(-1) if flip else y)
    ens = forward_self_ensemble(net, x)
    assert torch.allclose(ens, torch.stack(expected).mean(0), atol=1e-6)
    assert not torch.allclose(ens, net(x), atol=1e-3)  # the ensemble really differs from one pass


def test_denoising_tables_are_reproducible(tmp_path, shared_data):
    """Validation noise is seeded per image: two runs of a colour-DN test print the same table."""
    gt = tmp_path / 'CBSD68HQ'
    gt.mkdir()
    for path in sorted((shared_data / 'CBSD68').glob('*.png'))[:3]:
        cv2.imwrite(str(gt / path.name), cv2.imread(str(path))[:40, :48])
    net = dict(load_options('test/test_MambaIR_ColorDN_level25.yml')['network_g'], embed_dim=30, depths=[1],
               d_state=4)
    weights = tmp_path / 'dn.pth'
    torch.save({'params': build_network(net).state_dict()}, weights)
    opt = load_options('test/test_MambaIR_ColorDN_level25.yml')
    opt['datasets'] = {'test_1': dict(opt['datasets']['test_1'], dataroot_gt=str(gt))}
    opt.update(network_g=net, path=dict(pretrain_network_g=str(weights), strict_load_g=True))
    opt_file = write_options(tmp_path / 'dn.yml', opt)
    tables = []
    for _ in range(2):
        run_cli('mambair-test', '-opt', str(opt_file), cwd=tmp_path)
        results = tmp_path / 'results' / opt['name']
        tables.append(((results / 'results.md').read_text(), (results / 'per_image.csv').read_text()))
    assert tables[0] == tables[1]
    assert '| CBSD68 | 3 |' in tables[0][0]


def test_model_testing_uses_ema_weights_with_self_ensemble_and_tiles():
    """MambaIRModel.test(): the EMA network when there is one (the official code's ensemble used net_g)."""
    from basicsr.models import build_model

    net_opt = dict(type='MambaIR', upscale=2, in_chans=3, embed_dim=30, depths=[1], d_state=4, mlp_ratio=1.0,
                   upsampler='pixelshuffledirect')
    opt = dict(name='ema', model_type='MambaIRModel', scale=2, num_gpu=0, is_train=True, dist=False, rank=0,
               network_g=net_opt, path=dict(pretrain_network_g=None),
               train=dict(ema_decay=0.999, pixel_opt=dict(type='L1Loss', loss_weight=1.0),
                          optim_g=dict(type='Adam', lr=1e-3), scheduler=dict(type='MultiStepLR', milestones=[10])),
               val=dict(self_ensemble=True, tile=12, tile_overlap=4))
    model = build_model(opt)
    with torch.no_grad():  # make the trained weights differ from the EMA copy
        for p in model.net_g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 3, 20, 27)
    model.feed_data({'lq': x})
    model.test()

    def ema_tiles(lq):
        return forward_tiled(model.net_g_ema, lq, 2, tile=12, overlap=4)

    assert torch.allclose(model.output, forward_self_ensemble(ema_tiles, x), atol=1e-6)
    assert not torch.allclose(model.output, forward_self_ensemble(lambda lq: forward_tiled(
        model.net_g, lq, 2, tile=12, overlap=4), x), atol=1e-3)
    assert model.net_g.training  # testing put it back into training mode
