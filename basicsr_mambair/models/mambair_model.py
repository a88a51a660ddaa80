"""``MambaIRModel``: BasicSR's ``SRModel`` with tiled / self-ensemble testing and per-image results.

Training is exactly ``SRModel``'s (losses, EMA, optimizers, schedulers, saving). What differs:

- ``test()`` reads from the ``val`` options:
  ``tile`` (LQ pixels; ``~`` = whole image), ``tile_overlap`` (default 32), ``tile_batch``
  (tiles per forward, default 1), ``tile_mode`` (``blend``: overlapping tiles blended
  linearly; ``official``: the official MambaIR tiling with hard seams, to reproduce published
  numbers exactly) and ``self_ensemble`` (x8 flips/rotations). EMA weights are used when present.
  ``window_size`` (as in Restormer-style options) reflect-pads the input to a multiple of it
  and crops the output back.
- validation keeps every image's metric values (``per_image_results``) for result tables, stops with one line
  (:class:`~basicsr_mambair.errors.ImageError`) on a NaN/Inf output instead of reporting a PSNR of a black
  image, and writes its images atomically.
- a non-finite loss stops training with a clear error (instead of silently writing NaN weights).
- checkpoints load with ``weights_only=True`` and are written atomically (a run killed while
  saving never leaves a truncated file); any ``torch.optim`` optimizer can be named.
"""

from __future__ import annotations

import os
import os.path as osp
from collections import OrderedDict

import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from ..archs.arch_util import pad_to_multiple
from ..errors import NonFiniteLossError
from ..image_convert import check_finite_result
from ..image_io import write_image
from ..tiling import forward_official_tiles, forward_self_ensemble, forward_tiled
from ..utils.checkpoint import load_checked, read_state_dict, save_atomic, strip_module_prefix


@MODEL_REGISTRY.register()
class MambaIRModel(SRModel):
    """See the module docstring."""

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        # BasicSR 1.4.2 knows only Adam; any optimizer in torch.optim is accepted by name here.
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise ValueError(f"optim_g: unknown optimizer type '{optim_type}' (use a torch.optim class, e.g. AdamW)")
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path: str, strict: bool = True, param_key: str | None = 'params') -> None:
        """BasicSR's ``load_network``, safe and explicit.

        Reads with ``weights_only=True`` (pickled code is refused), takes ``param_key`` (falling back to
        ``params`` as BasicSR does, or a bare state dict), strips ``module.``. A checkpoint that does not fit
        raises one error naming the config difference and the keys; with ``strict=False`` mismatched shapes
        are skipped with a warning (BasicSR's convention, used to fine-tune x3/x4 from x2).
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
        for net_, key in zip(nets, keys):
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
        save_atomic(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    # ----------------------------------------------------------------- training
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
        """``SRModel``'s step with the hooks above and a check for a non-finite loss."""
        self.prepare_batch(current_iter)
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        l_total, loss_dict = self.compute_losses()
        self.check_finite(l_total, current_iter)
        l_total.backward()
        self.clip_gradients()
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ------------------------------------------------------------------ testing
    def _test_net(self) -> torch.nn.Module:
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g

    def restore(self, lq: torch.Tensor) -> torch.Tensor:
        """The configured inference (tiles, self-ensemble) on an LQ batch (B, C, H, W)."""
        val_opt = self.opt.get('val') or {}
        scale = self.opt.get('scale', 1)
        net = self._test_net()
        tile, mode = val_opt.get('tile'), val_opt.get('tile_mode', 'blend')
        if mode not in ('blend', 'official'):
            raise ValueError(f"val:tile_mode must be 'blend' or 'official', not '{mode}'")

        multiple = int(val_opt.get('window_size') or 1)

        def forward(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            x = pad_to_multiple(x, multiple)
            if mode == 'official':
                out = forward_official_tiles(net, x, scale)
            elif tile:
                out = forward_tiled(net, x, scale, int(tile), int(val_opt.get('tile_overlap', 32)),
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
        """BasicSR's validation loop, also keeping each image's metric values in ``per_image_results``."""
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics') or {}
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        rows: list[tuple[str, dict[str, float]]] = []
        pbar = tqdm(total=len(dataloader.dataset), unit='image', desc=f'Test {dataset_name}',
                    disable=not val_opt.get('pbar', not self.is_train))
        for data in dataloader:
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
                values = {}
                if metrics_opt and hasattr(self, 'gt'):
                    metric_data = dict(img=sr_img, img2=tensor2img([self.gt[i].detach().cpu()]))
                    values = {name: float(calculate_metric(metric_data, opt_)) for name, opt_ in metrics_opt.items()}
                rows.append((img_name, values))
                pbar.update(1)
            for attr in ('lq', 'gt', 'output'):
                if hasattr(self, attr):
                    delattr(self, attr)
        pbar.close()

        if not hasattr(self, 'per_image_results'):
            self.per_image_results = {}
        self.per_image_results[dataset_name] = rows
        if metrics_opt:
            self.metric_results = {m: sum(v[m] for _, v in rows) / max(len(rows), 1) for m in metrics_opt}
            for metric, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, metric, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter) -> str:
        vis = self.opt['path']['visualization']
        if self.opt['is_train']:
            return osp.join(vis, img_name, f'{img_name}_{current_iter}.png')
        suffix = self.opt['val'].get('suffix') or self.opt['name']
        return osp.join(vis, dataset_name, f'{img_name}_{suffix}.png')
