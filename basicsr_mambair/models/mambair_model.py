"""``MambaIRModel``: BasicSR's ``SRModel`` with tiled / self-ensemble testing and per-image results.

Training is exactly ``SRModel``'s (losses, EMA, optimizers, schedulers, saving). What differs:

- ``test()`` reads from the ``val`` options:
  ``tile`` (LQ pixels; ``~`` = whole image), ``tile_overlap`` (default 32), ``tile_batch``
  (tiles per forward, default 1), ``tile_mode`` (``blend``: overlapping tiles blended
  linearly; ``official``: the official MambaIR tiling with hard seams, to reproduce published
  numbers exactly) and ``self_ensemble`` (x8 flips/rotations). EMA weights are used when present.
  ``window_size`` (as in Restormer-style options) reflect-pads the input to a multiple of it
  and crops the output back.
- validation keeps every image's metric values (``per_image_results``) for result tables.
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

import os.path as osp
from collections import OrderedDict

import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from ..archs.arch_util import pad_to_multiple
from ..errors import NonFiniteLossError
from ..tiling import forward_official_tiles, forward_self_ensemble, forward_tiled
from ..utils.amp import MixedPrecision
from ..utils.checkpoint import load_checked, read_state_dict, save_atomic, strip_module_prefix


def compile_options(value) -> dict | None:
    """``torch.compile`` keyword arguments of a ``network_g:compile`` value (None: not compiled)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f'network_g:compile must be true, false or a mapping of torch.compile arguments, not {value!r}')


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
        """BasicSR's resume (optimizers, schedulers) plus the fp16 loss scale."""
        super().resume_training(resume_state)
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
                sr_img = tensor2img([self.output[i].detach().cpu()])
                if save_img:
                    imwrite(sr_img, self._visualization_path(dataset_name, img_name, current_iter))
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
