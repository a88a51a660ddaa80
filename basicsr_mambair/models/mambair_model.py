"""``MambaIRModel``: BasicSR's ``SRModel`` with tiled / self-ensemble testing and per-image results.

Training is exactly ``SRModel``'s (losses, EMA, optimizers, schedulers, saving). What differs:

- ``test()`` without tiling options is the official ``MambaIRModel.test()`` (spec 4.2: 200-pixel tiles
  with 10 % overlap and hard seams), so an official test file gives the official pipeline's numbers.
  The ``val`` options choose otherwise: ``tile: 0`` (or ``~``) the whole image in one forward;
  ``tile: N`` overlapping N-pixel LQ tiles blended smoothly (``tile_mode: blend``), with
  ``tile_overlap`` (default 32) and ``tile_batch`` (tiles per forward, default 1);
  ``tile_mode: official`` the official tiles explicitly. ``self_ensemble`` (x8 flips/rotations)
  and ``window_size`` (as in Restormer-style options: reflect-pad the input to a multiple of it,
  crop the output back) apply to any of them. EMA weights are used when present.
- validation keeps every image's metric values (``per_image_results``) for result tables, takes
  datasets without ground truth (real photos: saved outputs, no-reference metrics such as NIQE), stops
  with one line (:class:`~basicsr_mambair.errors.ImageError`) on a NaN/Inf output instead of reporting a
  PSNR of a black image, and writes its images atomically.
- a non-finite loss stops training with a clear error (instead of silently writing NaN weights).
- checkpoints load with ``weights_only=True`` and are written atomically (a run killed while
  saving never leaves a truncated file); any ``torch.optim`` optimizer can be named.
- ``train:use_amp: bf16 | fp16``: mixed-precision training (:mod:`..utils.amp`; fp16 with a GradScaler,
  whose state is kept in the training state); the scan and the losses stay float32, checkpoints float32.
- ``network_g:compile: true`` (or a mapping of ``torch.compile`` arguments, e.g. ``{mode: max-autotune}``):
  the network's forward is compiled in place (``nn.Module.compile``: parameter names, and so checkpoints,
  are unchanged); the selective scan is one opaque op in the graph (:mod:`..ops.scan.op`).
"""

from __future__ import annotations

import math
import os
import os.path as osp
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from ..archs.arch_util import pad_to_multiple
from ..errors import NonFiniteLossError, OptionError
from ..image_convert import check_finite_result
from ..image_io import write_image
from ..options import compile_options, needs_ground_truth
from ..tiling import forward_official_tiles, forward_self_ensemble, forward_tiled
from ..utils.amp import MixedPrecision
from ..utils.checkpoint import load_checked, read_state_dict, save_atomic, strip_module_prefix


@MODEL_REGISTRY.register()
class MambaIRModel(SRModel):
    """See the module docstring."""

    def __init__(self, opt: dict) -> None:
        # `compile` is ours, not the arch's: taken out before BasicSR builds net_g (and net_g_ema) from network_g
        net_opt = opt.get('network_g')
        self.compile_kwargs = compile_options(net_opt.pop('compile', None)) if isinstance(net_opt, dict) else None
        super().__init__(opt)
        if self.compile_kwargs is not None:
            self.get_bare_model(self.net_g).compile(**self.compile_kwargs)
            get_root_logger().info(f'network_g compiled with torch.compile({self.compile_kwargs})')

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        # BasicSR 1.4.2 knows only Adam; any optimizer in torch.optim is accepted by name here.
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise ValueError(f"optim_g: unknown optimizer type '{optim_type}' (use a torch.optim class, e.g. AdamW)")
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path: str, strict: bool = True, param_key: str | None = 'params') -> None:
        """BasicSR's ``load_network``, safe and explicit.

        Reads a ``.pth`` with ``weights_only=True`` (pickled code is refused) or a ``.safetensors`` file, takes
        ``param_key`` (falling back to ``params`` as BasicSR does, or a bare state dict), strips ``module.``.
        A checkpoint that does not fit raises one error naming the config difference and the keys; with
        ``strict=False`` mismatched shapes are skipped with a warning (BasicSR's convention, used to fine-tune
        x3/x4 from x2).
        """
        logger = get_root_logger()
        net = self.get_bare_model(net)
        state_dict = read_state_dict(load_path, param_key, logger=logger)
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        load_checked(net, state_dict, strict=strict, source=load_path, logger=logger)

    @master_only
    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        """BasicSR's ``save_network`` (``{param_key: state_dict}``, no ``module.``), written atomically."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, keys):  # Module.compile keeps the names; this also unwraps DDP
            state = self.get_bare_model(net_).state_dict()
            save_dict[key] = {k: v.cpu() for k, v in strip_module_prefix(state).items()}
        name = f"{net_label}_{'latest' if current_iter == -1 else current_iter}.pth"
        save_atomic(save_dict, osp.join(self.opt['path']['models'], name))

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        """BasicSR's ``save_training_state`` (optimizers, schedulers, epoch, iter), written atomically."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        amp_state = self.amp.state_dict() if hasattr(self, 'amp') else None
        if amp_state is not None:
            state['amp_scaler'] = amp_state
        save_atomic(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state: dict) -> None:
        """BasicSR's resume (optimizers, schedulers) plus the fp16 loss scale (where this model trains with AMP:
        subclasses with their own training step, e.g. the Real-ESRGAN ones, have none)."""
        super().resume_training(resume_state)
        if hasattr(self, 'amp'):
            self.amp.load_state_dict(resume_state.get('amp_scaler'))

    # ----------------------------------------------------------------- training
    def init_training_settings(self) -> None:
        self.amp = MixedPrecision(self.opt['train'].get('use_amp'), self.device)
        if self.amp.dtype is not None:
            get_root_logger().info(f'Mixed-precision training: {self.amp.name} autocast'
                                   + (' with a GradScaler' if self.amp.scaler is not None else ''))
        super().init_training_settings()

    def prepare_batch(self, current_iter: int) -> None:
        """Hook to change ``self.lq``/``self.gt`` before the training forward (augmentations)."""

    def clip_gradients(self) -> None:
        """Hook called between ``backward`` and the optimizer step."""

    def compute_losses(self) -> tuple[torch.Tensor, OrderedDict]:
        """Total loss and its named terms for ``self.output`` against ``self.gt`` (as ``SRModel``)."""
        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(self.output, self.gt)
            l_total += l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for name, term in (('l_percep', l_percep), ('l_style', l_style)):
                if term is not None:
                    l_total += term
                    loss_dict[name] = term
        return l_total, loss_dict

    def check_finite(self, loss: torch.Tensor, current_iter: int) -> None:
        finite = torch.isfinite(loss.detach()).all().float()
        if self.opt['dist']:  # every rank must stop together, or the others hang in backward
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise NonFiniteLossError(
                f'non-finite loss ({loss.item()}) at iteration {current_iter} of {self.opt["name"]}; training stopped, '
                f'checkpoints so far are in {self.opt["path"]["models"]} (lower train:optim_g:lr or check the data)')

    def optimize_parameters(self, current_iter: int) -> None:
        """``SRModel``'s step with the hooks above, mixed precision and a check for a non-finite loss."""
        self.prepare_batch(current_iter)
        self.optimizer_g.zero_grad()
        with self.amp.autocast():
            output = self.net_g(self.lq)
        self.output = output.float()  # losses in float32, whatever autocast made of the forward
        l_total, loss_dict = self.compute_losses()
        self.check_finite(l_total, current_iter)
        self.amp.backward(l_total)
        self.amp.unscale(self.optimizer_g)  # clipping sees the true gradients
        self.clip_gradients()
        self.amp.step(self.optimizer_g)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ------------------------------------------------------------------ testing
    def _test_net(self) -> torch.nn.Module:
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g

    #: what ``test()`` does when the ``val`` options name no tiling: ``'official'`` (the official class's
    #: 200-pixel tiles) or ``'whole'`` (one forward of the whole image)
    default_tiling = 'official'

    def tiling(self) -> tuple[str, int]:
        """``('official' | 'blend' | 'whole', tile)`` from the ``val`` options (see the module docstring)."""
        val_opt = self.opt.get('val') or {}
        mode, tile = val_opt.get('tile_mode'), val_opt.get('tile')
        if mode is None and 'tile' not in val_opt:
            return self.default_tiling, 0
        if mode not in (None, 'blend', 'official'):
            raise ValueError(f"val:tile_mode must be 'blend' or 'official', not '{mode}'")
        if mode == 'official':
            return 'official', 0
        return ('blend', int(tile)) if tile else ('whole', 0)

    def restore(self, lq: torch.Tensor) -> torch.Tensor:
        """The configured inference (tiles, self-ensemble) on an LQ batch (B, C, H, W)."""
        val_opt = self.opt.get('val') or {}
        scale = self.opt.get('scale', 1)
        net = self._test_net()
        mode, tile = self.tiling()
        multiple = int(val_opt.get('window_size') or 1)

        def forward(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            x = pad_to_multiple(x, multiple)
            if mode == 'official':
                out = forward_official_tiles(net, x, scale)
            elif mode == 'blend':
                out = forward_tiled(net, x, scale, tile, int(val_opt.get('tile_overlap', 32)),
                                    int(val_opt.get('tile_batch', 1)))
            else:
                out = net(x)
            return out[..., :h * scale, :w * scale]

        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                return forward_self_ensemble(forward, lq) if val_opt.get('self_ensemble') else forward(lq)
        finally:
            net.train(was_training)

    def test(self) -> None:
        self.output = self.restore(self.lq)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img: bool) -> None:
        """BasicSR's validation loop, also keeping each image's metric values in ``per_image_results``.

        Datasets without ground truth (``SingleImageDataset``: real photos) are fine: their outputs are saved
        and scored with the no-reference metrics only (e.g. ``calculate_niqe``); a metric that needs ground
        truth raises :class:`OptionError` naming it.
        """
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics') or {}
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        rows: list[tuple[str, dict[str, float]]] = []
        pbar = tqdm(total=len(dataloader.dataset), unit='image', desc=f'Test {dataset_name}',
                    disable=not val_opt.get('pbar', not self.is_train))
        for data in dataloader:
            self._drop_batch()  # a training batch's gt must not stand in for a dataset without one
            self.feed_data(data)
            self.test()
            for i, lq_path in enumerate(data['lq_path']):
                img_name = osp.splitext(osp.basename(lq_path))[0]
                check_finite_result(self.output[i], lq_path)
                sr_img = tensor2img([self.output[i].detach().cpu()])
                if save_img:
                    path = self._visualization_path(dataset_name, img_name, current_iter)
                    os.makedirs(osp.dirname(path), exist_ok=True)
                    write_image(path, sr_img)  # atomic and verified (BasicSR's imwrite is neither)
                gt_img = tensor2img([self.gt[i].detach().cpu()]) if hasattr(self, 'gt') else None
                values = {}
                for name, opt_ in metrics_opt.items():
                    value = self._metric(name, opt_, sr_img, gt_img, dataset_name)
                    if math.isfinite(value):
                        values[name] = value
                    else:  # e.g. NIQE of an image too small for its 96-pixel blocks, PSNR of identical images
                        get_root_logger().warning(f'{name} of {img_name} ({dataset_name}) is {value}: left out')
                rows.append((img_name, values))
                pbar.update(1)
            self._drop_batch()
        pbar.close()

        if not hasattr(self, 'per_image_results'):
            self.per_image_results = {}
        self.per_image_results[dataset_name] = rows
        if metrics_opt:
            finite = {m: [v[m] for _, v in rows if m in v] for m in metrics_opt}
            self.metric_results = {m: sum(found) / len(found) for m, found in finite.items() if found}
            for metric, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, metric, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _drop_batch(self) -> None:
        for attr in ('lq', 'gt', 'output'):
            if hasattr(self, attr):
                delattr(self, attr)

    @staticmethod
    def _metric(name: str, metric_opt: dict, img: np.ndarray, gt: np.ndarray | None, dataset_name: str) -> float:
        """``val:metrics:<name>`` of the output ``img`` (HWC BGR uint8): against ``gt`` for full-reference
        metrics (those taking ``img2``, e.g. PSNR), on ``img`` alone for no-reference ones (e.g. NIQE)."""
        if not needs_ground_truth(metric_opt['type']):
            return float(calculate_metric(dict(img=img), metric_opt))
        if gt is None:
            raise OptionError(f"val:metrics:{name} ({metric_opt['type']}) compares with ground truth, but dataset "
                              f"'{dataset_name}' has none (no dataroot_gt): remove it, or use a no-reference "
                              'metric such as calculate_niqe')
        return float(calculate_metric(dict(img=img, img2=gt), metric_opt))

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter) -> str:
        vis = self.opt['path']['visualization']
        if self.opt['is_train']:
            return osp.join(vis, img_name, f'{img_name}_{current_iter}.png')
        suffix = self.opt['val'].get('suffix') or self.opt['name']
        return osp.join(vis, dataset_name, f'{img_name}_{suffix}.png')
