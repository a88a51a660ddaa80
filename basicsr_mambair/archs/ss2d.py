"""SS2D: the 2-D selective-scan module of MambaIR / MambaIRUNet (a VSSBlock's global branch).

A feature map is read as four 1-D sequences -- row-major, column-major and both reversed -- each
scanned by its own selective state-space model (Mamba's S6); the four outputs are mapped back to
the image grid and summed.

Two ways to compute it, with the same parameters and results:

- fused (what ``auto`` runs on a CPU in float32): the C kernel walks the four orders of the channels-last
  map in place (:func:`~basicsr_mambair.ops.scan.fused.scan_cross`). The x projection of all directions
  is one matmul on the un-expanded map (a permutation of the positions commutes with it) and the dt
  projection happens inside the kernel, so nothing of size 4 x (B, d_inner, L) exists.
- unfused (every other backend, and ``compiled-unfused``): the official data flow. :func:`cross_scan`
  materialises the four orders and one ``selective_scan`` call scans them (channel block
  ``k*d_inner:(k+1)*d_inner`` belongs to direction ``k``, B/C have 4 groups); :func:`cross_merge` maps the
  outputs back and sums them.

Parameter names, shapes and initialisation follow the official ``SS2D`` so that the released
checkpoints load with strict=True (spec 1.5):

===================  =============================  =======================================
key                  shape                          init
===================  =============================  =======================================
``in_proj.weight``   (2*d_inner, d_model)           nn.Linear default (MambaIR re-inits it)
``conv2d.*``         (d_inner, 1, k, k), (d_inner)  nn.Conv2d default (depthwise)
``x_proj_weight``    (4, dt_rank + 2N, d_inner)     nn.Linear default, per direction
``dt_projs_weight``  (4, d_inner, dt_rank)          U(+-dt_rank^-0.5 * dt_scale)
``dt_projs_bias``    (4, d_inner)                   softplus^-1 of log-uniform dt in [dt_min, dt_max]
``A_logs``           (4*d_inner, N)                 log(1..N) (S4D-real)
``Ds``               (4*d_inner,)                   ones
``out_norm.*``       (d_inner,)                     LayerNorm
``out_proj.weight``  (d_model, d_inner)             nn.Linear default
===================  =============================  =======================================

with ``d_inner = int(expand * d_model)`` and ``dt_rank = ceil(d_model / 16)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import linear
from ..ops.scan import selective_scan, uses_fused_kernel
from ..ops.scan.fused import scan_cross
from .arch_util import autocast_disabled

NUM_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a feature map into the four scan orders.

    Args:
        x: (B, D, H, W).

    Returns:
        (B, 4, D, H*W): [row-major, column-major, reversed row-major, reversed column-major]; position
        ``h*W + w`` of direction 0 and ``w*H + h`` of direction 1 hold ``x[..., h, w]``.
    """
    if torch.onnx.is_in_onnx_export():  # the copies into views below would export as slow scatters
        rows_cols = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
        return torch.cat([rows_cols, rows_cols.flip(-1)], dim=1)
    b, d, h, w = x.shape
    xs = x.new_empty(b, NUM_DIRECTIONS, d, h * w)
    # Two strided copies straight into the output (no stack/cat temporaries), then one flip for both
    # reversed orders; torch has no negative strides, so the flip must materialise once.
    xs[:, 0].view(b, d, h, w).copy_(x)
    xs[:, 1].view(b, d, w, h).copy_(x.transpose(2, 3))
    xs[:, 2:].copy_(xs[:, :2].flip(-1))
    return xs


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Fold the four scan outputs back onto the grid and sum them (inverse of :func:`cross_scan`).

    Args:
        ys: (B, 4, D, H*W) in the direction order of :func:`cross_scan`.
        h, w: the grid size.

    Returns:
        (B, H, W, D) channels-last sum of the four directions, contiguous.
    """
    b, _, d, _ = ys.shape
    # Undo both reversals in one flip, then bring the column-major half back to row-major.
    y = ys[:, :2] + ys[:, 2:].flip(-1)  # (B, 2, D, L)
    y_rows = y[:, 0].view(b, d, h, w).permute(0, 2, 3, 1)  # (B, H, W, D) views
    y_cols = y[:, 1].view(b, d, w, h).permute(0, 3, 2, 1)
    return (y_rows + y_cols).contiguous()


@torch.no_grad()
def init_ssm_parameters(x_proj_weight: nn.Parameter, dt_projs_weight: nn.Parameter, dt_projs_bias: nn.Parameter,
                        A_logs: nn.Parameter, Ds: nn.Parameter, dt_scale: float = 1.0, dt_init: str = 'random',
                        dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
    """Official initialisation of the raw SSM parameters of K scan directions (SS2D: K = 4; MambaIRv2: K = 1).

    Shapes: ``x_proj_weight`` (K, R + 2N, D), ``dt_projs_weight`` (K, D, R), ``dt_projs_bias`` (K, D),
    ``A_logs`` (rows, N), ``Ds`` (rows,); R = dt rank, N = state size.
    """
    for weight in x_proj_weight:  # what nn.Linear(D, R + 2N, bias=False) would draw, per direction
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    std = dt_projs_weight.shape[-1] ** -0.5 * dt_scale
    if dt_init == 'constant':
        nn.init.constant_(dt_projs_weight, std)
    elif dt_init == 'random':
        nn.init.uniform_(dt_projs_weight, -std, std)
    else:
        raise ValueError(f"selective scan: dt_init must be 'random' or 'constant', got {dt_init!r}")
    # Step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus so that
    # softplus(bias) reproduces them at the first forward.
    rand = torch.rand(dt_projs_bias.shape, device=dt_projs_bias.device)
    dt = torch.exp(rand * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    A_logs.copy_(torch.log(torch.arange(1, A_logs.shape[-1] + 1, dtype=torch.float32)).expand_as(A_logs))
    Ds.fill_(1.0)


class SS2D(nn.Module):
    """2-D selective scan over four directions, gated by ``silu(z)`` (spec 1.5).

    Args:
        d_model: input/output channels C.
        d_state: SSM state size N.
        d_conv: depthwise conv kernel size.
        expand: ``d_inner = int(expand * d_model)``.
        dt_rank: rank of the dt projection; ``'auto'`` = ``ceil(d_model / 16)``.
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        dt_init: ``'random'`` (uniform dt projection weights) or ``'constant'``.
        dt_scale: scale of the dt projection init.
        dt_init_floor: lower clamp of the initial step size.
        dropout: dropout on the output (no module when 0, as officially).
        conv_bias: bias of the depthwise conv.
        bias: bias of ``in_proj`` / ``out_proj``.
        device, dtype: factory arguments for the parameters.
        **kwargs: ignored (the official block forwards e.g. ``input_resolution`` here).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = 'auto', dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = 'random',
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, dropout: float = 0.0, conv_bias: bool = True,
                 bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **kwargs) -> None:
        super().__init__()
        factory = {'device': device, 'dtype': dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        k, d, r, n = NUM_DIRECTIONS, self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * d, bias=bias, **factory)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=conv_bias, **factory)
        # Per-direction projections kept as stacked raw parameters: these are the checkpoint's names.
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d, **factory))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r, **factory))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d, **factory))
        # A and D are flattened over directions (4*d_inner rows), unlike the three above.
        self.A_logs = nn.Parameter(torch.empty(k * d, n, device=device, dtype=torch.float32))
        self.Ds = nn.Parameter(torch.empty(k * d, device=device, dtype=torch.float32))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d, **factory)
        self.out_proj = nn.Linear(d, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

        # The Linear/Conv/LN parameters keep torch's default init.
        init_ssm_parameters(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                            dt_scale, dt_init, dt_min, dt_max, dt_init_floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, d_model) channels-last -> (B, H, W, d_model)."""
        d = self.d_inner
        # Inference (no autograd) may overwrite its own intermediates: fewer allocations and passes.
        inplace = not torch.is_grad_enabled()
        fused = uses_fused_kernel(x.device, x.dtype)
        if fused:  # two projections, each contiguous: the conv and the gate then read dense tensors
            bias = self.in_proj.bias
            u = linear(x, self.in_proj.weight[:d], None if bias is None else bias[:d])
            z = linear(x, self.in_proj.weight[d:], None if bias is None else bias[d:])
        else:
            u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d_inner) each; z is the output gate
        # The depthwise conv on the channels-last NCHW view (its output stays channels-last).
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2)), inplace=inplace)  # (B, d_inner, H, W)

        # The scan always runs in float32, also under fp16/bf16 autocast or in a half-precision model:
        # exp(dt * A) and the long recurrence lose too much in 16 bits (the official CUDA call is fp32 too).
        y = self._scan_fused(u.permute(0, 2, 3, 1)) if fused else self._scan_unfused(u)  # (B, H, W, d) float32
        # Back to the parameters' precision (a no-op for fp32 models, also under autocast, where
        # the following LayerNorm runs in fp32 anyway).
        y = self.out_norm(y.to(self.out_norm.weight.dtype))
        y = y.mul_(F.silu(z, inplace=inplace)) if inplace else y * F.silu(z)
        out = linear(y, self.out_proj.weight, self.out_proj.bias)
        if self.dropout is not None:
            out = self.dropout(out)
        return out

    def _ssm_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = -exp(A_logs), D and the dt bias in float32 (flattened over directions)."""
        return -torch.exp(self.A_logs.float()), self.Ds.float(), self.dt_projs_bias.float()

    def _scan_fused(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, H, W, d_inner) channels-last -> the four directions' outputs summed, (B, H, W, d_inner) fp32."""
        k, d = NUM_DIRECTIONS, self.d_inner
        proj = linear(u, self.x_proj_weight.reshape(k * (self.dt_rank + 2 * self.d_state), d))  # (B, H, W, 4(R+2N))
        with autocast_disabled(u.device.type):
            A, D, dt_bias = self._ssm_parameters()
            return scan_cross(u.float(), proj.float(), self.dt_projs_weight.float(), dt_bias, A, D)

    def _scan_unfused(self, u: torch.Tensor) -> torch.Tensor:
        """The official data flow: u (B, d_inner, H, W) -> (B, H, W, d_inner) float32 (see the module doc)."""
        b, _, h, w = u.shape
        length = h * w
        k, n = NUM_DIRECTIONS, self.d_state
        xs = cross_scan(u)  # (B, 4, d_inner, L)
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, 4, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (B, 4, d_inner, L)
        with autocast_disabled(u.device.type):
            A, D, dt_bias = self._ssm_parameters()
            ys = selective_scan(xs.float().view(b, -1, length), dts.float().view(b, -1, length), A, bs.float(),
                                cs.float(), D, z=None, delta_bias=dt_bias.view(-1), delta_softplus=True,
                                return_last_state=False).view(b, k, -1, length)
            return cross_merge(ys.float(), h, w)  # summed in float32

    def extra_repr(self) -> str:
        return f'd_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}'
