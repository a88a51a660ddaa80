"""The test pipeline: BasicSR's, plus a results table per run (Markdown + CSV, also printed).

BasicSR's ``test_pipeline`` only logs mean metrics per dataset; benchmark users want the table
(dataset x metric) and every image's values in files they can diff and paste.
"""

from __future__ import annotations

import csv
import io
import logging
import os.path as osp

import torch
from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model
from basicsr.utils import get_env_info, get_time_str, make_exp_dirs
from basicsr.utils.options import dict2str

from .compat import get_root_logger, parse_options
from .utils.files import atomic_write_bytes

# how each metric is printed: BasicSR's names -> (column title, decimals)
_FORMATS = {'psnr': ('PSNR (dB)', 4), 'ssim': ('SSIM', 4), 'psnr_y': ('PSNR-Y (dB)', 4), 'ssim_y': ('SSIM-Y', 4),
            'niqe': ('NIQE', 4)}


def _fmt(metric: str, value: float) -> str:
    return f'{value:.{_FORMATS.get(metric, (metric, 4))[1]}f}'


def results_table(results: dict[str, dict[str, float]], counts: dict[str, int] | None = None) -> str:
    """Markdown table, one row per dataset: ``| dataset | images | PSNR (dB) | SSIM |``."""
    metrics = list(dict.fromkeys(m for values in results.values() for m in values))
    head = ['dataset'] + (['images'] if counts else []) + [_FORMATS.get(m, (m,))[0] for m in metrics]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, values in results.items():
        cells = [name] + ([str(counts[name])] if counts else []) + [_fmt(m, values[m]) if m in values else '-'
                                                                    for m in metrics]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def published_style(results: dict[str, dict[str, float]]) -> str:
    """One line per dataset as papers print it, e.g. ``Set5: 38.57 / 0.9627``."""
    lines = []
    for name, values in results.items():
        parts = [f'{values[m]:.2f}' if 'psnr' in m else f'{values[m]:.4f}' for m in values]
        lines.append(f'{name}: {" / ".join(parts)}')
    return '\n'.join(lines)


def _csv(rows: list[list]) -> bytes:
    buffer = io.StringIO(newline='')
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def write_results(folder: str, results: dict[str, dict[str, float]],
                  per_image: dict[str, list[tuple[str, dict[str, float]]]]) -> str:
    """Write ``results.md``, ``results.csv`` and ``per_image.csv`` into ``folder`` (atomically); return the table."""
    counts = {name: len(per_image.get(name, [])) for name in results}
    table = results_table(results, counts)
    metrics = list(dict.fromkeys(m for values in results.values() for m in values))
    summary = [['dataset', 'images', *metrics]]
    summary += [[name, counts[name], *(values.get(m, '') for m in metrics)] for name, values in results.items()]
    rows = [['dataset', 'image', *metrics]]
    rows += [[name, image, *(values.get(m, '') for m in metrics)] for name, items in per_image.items()
             for image, values in items]
    atomic_write_bytes(osp.join(folder, 'results.md'), (table + '\n\n' + published_style(results) + '\n').encode())
    atomic_write_bytes(osp.join(folder, 'results.csv'), _csv(summary))
    atomic_write_bytes(osp.join(folder, 'per_image.csv'), _csv(rows))
    return table


def test_pipeline(root_path: str) -> dict[str, dict[str, float]]:
    """BasicSR's test pipeline (options from ``sys.argv``) that ends with the results table."""
    opt, _ = parse_options(root_path, is_train=False)
    torch.backends.cudnn.benchmark = True
    make_exp_dirs(opt)
    log_file = osp.join(opt['path']['log'], f"test_{opt['name']}_{get_time_str()}.log")
    logger = get_root_logger(logger_name='basicsr', log_level=logging.INFO, log_file=log_file)
    logger.info(get_env_info())
    logger.info(dict2str(opt))

    loaders = []
    for _, dataset_opt in sorted(opt['datasets'].items()):
        dataset = build_dataset(dataset_opt)
        loaders.append(build_dataloader(dataset, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                        sampler=None, seed=opt['manual_seed']))
        logger.info(f"Number of test images in {dataset_opt['name']}: {len(dataset)}")

    model = build_model(opt)
    results: dict[str, dict[str, float]] = {}
    per_image: dict[str, list] = {}
    for loader in loaders:
        name = loader.dataset.opt['name']
        logger.info(f'Testing {name}...')
        model.validation(loader, current_iter=opt['name'], tb_logger=None, save_img=opt['val'].get('save_img', False))
        results[name] = dict(getattr(model, 'metric_results', None) or {})
        per_image[name] = list(getattr(model, 'per_image_results', {}).get(name, []))

    if opt['rank'] == 0 and any(results.values()):
        table = write_results(opt['path']['results_root'], results, per_image)
        logger.info(f"Results of {opt['name']} ({osp.join(opt['path']['results_root'], 'results.md')}):\n"
                    f'{table}\n{published_style(results)}')
    return results
