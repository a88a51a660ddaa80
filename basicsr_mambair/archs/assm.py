"""ASSM: the attentive state-space module of MambaIRv2 (spec 2.6, 2.7, 2.10).

Every token is routed to one of ``num_tokens`` prompt classes; the tokens are sorted by class (so that
tokens of similar content become neighbours in the 1-D sequence), scanned by a single-direction
selective scan whose output matrix C gets each token's prompt added, and put back in raster order.

Routing modes (:data:`ROUTING_MODES`; ``None`` = ``'gumbel'`` in ``train()``, ``'deterministic'`` in ``eval()``):

* ``'gumbel'``: the official straight-through Gumbel-softmax (``F.gumbel_softmax``, tau 1): the class
  is the argmax of the noisy soft assignment; the noise comes from the global torch RNG.
* ``'deterministic'``: the class is the argmax of the route log-probabilities (no noise); gradients
  reach the route through the same straight-through estimator, on the noiseless softmax. (The
  network also runs a batch one image at a time in this mode, see ``MambaIRv2.forward``.)

Both modes sort with a **stable** sort (the official ``torch.sort(stable=False)`` orders the tokens of a
class arbitrarily, spec 2.10), so the deterministic output is a function of the input alone.

Quirk kept from the official code: the prompts are added to C in **raster** order while the sequence
is in sorted order (position i of the sorted sequence receives the prompt of raster token i).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import linear
from ..ops.scan import selective_scan, uses_fused_kernel
from ..ops.scan.fused import scan_permuted
from .arch_util import autocast_disabled
from .ss2d import init_ssm_parameters

ROUTING_MODES = ('deterministic', 'gumbel')


def check_routing(routing: str | None) -> str | None:
    """``routing`` if it is a known mode or None; otherwise a ValueError naming it."""
    if routing is not None and routing not in ROUTING_MODES:
        raise ValueError(f'routing must be one of {ROUTING_MODES} or None, got {routing!r}')
    return routing


def sort_permutation(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of each row of ``classes`` (B, L): the order ``idx`` and its inverse ``inv`` (both (B, L)).

    ``x.gather(-1, idx)`` groups the tokens by class keeping their raster order inside a class;
    ``y.gather(-1, inv)`` undoes it.
    """
    idx = torch.argsort(classes, dim=-1, stable=True)
    positions = torch.arange(classes.shape[-1], device=classes.device).expand_as(idx)
    inv = torch.empty_like(idx).scatter_(-1, idx, positions)
    return idx, inv


class SelectiveScan(nn.Module):
    """One-direction selective scan with a prompt added to C (official ``Selective_Scan``, K = 1).

    Args:
        d_model: channels D of the scanned sequence.
        d_state: state size N.
        expand: ``d_inner = int(expand * d_model)`` (1 in MambaIRv2).
        dt_rank: rank of the dt projection; ``'auto'`` = ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of the step sizes (as in SS2D).

    Keys: ``x_proj_weight`` (1, R + 2N, D), ``dt_projs_weight`` (1, D, R), ``dt_projs_bias`` (1, D),
    ``A_logs`` (D, N), ``Ds`` (D,).
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 1.0, dt_rank: int | str = 'auto',
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = 'random', dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, **kwargs) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        d, r, n = self.d_inner, self.dt_rank, d_state
        self.x_proj_weight = nn.Parameter(torch.empty(1, r + 2 * n, d))
        self.dt_projs_weight = nn.Parameter(torch.empty(1, d, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(1, d))
        self.A_logs = nn.Parameter(torch.empty(d, n))
        self.Ds = nn.Parameter(torch.empty(d))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        init_ssm_parameters(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                            dt_scale, dt_init, dt_min, dt_max, dt_init_floor)

    def forward(self, u: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """u: (B, D, L) the sequence, channels first; prompt: (B, L, N). Returns (B, D, L) in float32."""
        x_dbl = torch.matmul(self.x_proj_weight[0], u)  # (B, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dts = torch.matmul(self.dt_projs_weight[0], dts)  # (B, D, L)
        cs = cs + prompt.transpose(1, 2)  # the "attentive" state-space equation: C += P
        # float32 scan also under autocast / in a half-precision model (see SS2D.forward).
        with autocast_disabled(u.device.type):
            return selective_scan(u.float(), dts.float(), -torch.exp(self.A_logs.float()),
                                  bs.float().unsqueeze(1), cs.float().unsqueeze(1), self.Ds.float(), z=None,
                                  delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True)

    def forward_permuted(self, u: torch.Tensor, prompt: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """The same scan over ``u[perm]`` written back at the positions, by the fused CPU kernel (no sorted
        copies): u (B, L, D) tokens in raster order, prompt (B, L, N) added at *step* t, perm (B, L) int64.
        Returns (B, L, D) float32 in raster order."""
        proj = linear(u, self.x_proj_weight[0])  # (B, L, R + 2N); projecting commutes with the permutation
        with autocast_disabled(u.device.type):
            return scan_permuted(u.float(), proj.float(), self.dt_projs_weight.float(), self.dt_projs_bias.float(),
                                 -torch.exp(self.A_logs.float()), self.Ds.float(), perm, c_add=prompt.float())

    def extra_repr(self) -> str:
        return f'd_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}'


class ASSM(nn.Module):
    """Attentive state-space module: route, sort, prompted scan, unsort (spec 2.6).

    Args:
        dim: token channels C.
        d_state: state size N (also the prompt width).
        input_resolution: recorded only.
        num_tokens: number of prompt classes T.
        inner_rank: rank of the prompt pool ``embeddingB.weight @ embeddingA.weight`` (T x N).
        mlp_ratio: scan width ``hidden = int(mlp_ratio * C)``.
        routing: one of :data:`ROUTING_MODES`, or None for gumbel in training and deterministic in eval.

    Keys: ``in_proj.0`` (1x1 conv C -> hidden), ``CPE.0`` (depthwise 3x3), ``embeddingB`` (T, inner_rank),
    ``route.0`` (Linear C -> C/3), ``route.2`` (Linear C/3 -> T), ``selectiveScan.*``, ``out_norm``, ``out_proj``.
    """

    def __init__(self, dim: int, d_state: int, input_resolution: Sequence[int] | None = None, num_tokens: int = 64,
                 inner_rank: int = 128, mlp_ratio: float = 2.0, routing: str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_tokens = num_tokens
        self.inner_rank = inner_rank
        hidden = int(dim * mlp_ratio)
        self.hidden = hidden
        self.routing = check_routing(routing)

        self.in_proj = nn.Sequential(nn.Conv2d(dim, hidden, 1, 1, 0))
        self.CPE = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden))  # conditional position encoding
        self.embeddingB = nn.Embedding(num_tokens, inner_rank)
        nn.init.uniform_(self.embeddingB.weight, -1 / num_tokens, 1 / num_tokens)
        self.route = nn.Sequential(nn.Linear(dim, dim // 3), nn.GELU(), nn.Linear(dim // 3, num_tokens),
                                   nn.LogSoftmax(dim=-1))
        self.selectiveScan = SelectiveScan(hidden, d_state=d_state, expand=1)
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, dim, bias=True)

    def active_routing(self) -> str:
        """The routing mode this forward uses (``routing``, or the default of the train/eval mode)."""
        if self.routing is not None:
            return self.routing
        return 'gumbel' if self.training else 'deterministic'

    def route_tokens(self, x: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classes (B, L) int64 and prompts (B, L, N) of the tokens x (B, L, C), from the prompt pool (T, N)."""
        logits = self.route[:-1](x)  # (B, L, T); route[-1] is the LogSoftmax
        if self.active_routing() == 'gumbel':
            soft = F.gumbel_softmax(self.route[-1](logits), tau=1.0, hard=False, dim=-1)
            classes = soft.argmax(dim=-1)
        else:
            # The argmax of the log-probabilities, taken on the logits: log_softmax subtracts a common
            # constant whose rounding can tie or even swap near-equal values (measured: 7 ties and 2 swaps
            # among 506,880 routed tokens of one Set14 image), the logits give the most probable class exactly.
            classes = logits.argmax(dim=-1)
            soft = logits.softmax(dim=-1) if logits.requires_grad else None
        prompt = pool[classes]  # exactly the official one-hot @ pool, without the T-wide product
        if soft is not None and soft.requires_grad:
            # Straight-through: zero in value, but the gradient reaches the route as through the official
            # `(one_hot - soft.detach() + soft) @ pool`.
            prompt = prompt + (soft - soft.detach()) @ pool
        return classes, prompt

    def forward(self, x: torch.Tensor, x_size: Sequence[int], token: nn.Embedding) -> torch.Tensor:
        """x: (B, L, C) normalised tokens in raster order; x_size: (H, W); token: the layer's ``embeddingA``.

        Returns (B, L, C) in raster order.
        """
        b, length, c = x.shape
        h, w = x_size
        pool = self.embeddingB.weight @ token.weight  # (T, N) prompt pool
        classes, prompt = self.route_tokens(x, pool)
        idx, inv = sort_permutation(classes)

        # The 1x1 conv in_proj as the equal matmul on the tokens: oneDNN's 1x1 convolution of an NCHW map
        # rounds differently for 1 and 2 threads, the matmul does not (a 1-ulp change can flip a route).
        conv = self.in_proj[0]
        v = F.linear(x, conv.weight.flatten(1), conv.bias)  # (B, L, hidden)
        v = v.transpose(1, 2).reshape(b, self.hidden, h, w)
        v = (v * torch.sigmoid(self.CPE(v))).flatten(2)  # (B, hidden, L)
        if uses_fused_kernel(v.device, v.dtype):  # sorted and scattered back inside the kernel
            y = self.selectiveScan.forward_permuted(v.transpose(1, 2), prompt, idx)  # (B, L, hidden) raster order
            return self.out_proj(self.out_norm(y.to(self.out_norm.weight.dtype)))
        v = v.gather(2, idx.unsqueeze(1).expand(-1, self.hidden, -1))  # sorted by class
        y = self.selectiveScan(v, prompt)  # (B, hidden, L), prompts NOT permuted (official)
        y = self.out_proj(self.out_norm(y.transpose(1, 2).to(self.out_norm.weight.dtype)))  # (B, L, C) sorted
        return y.gather(1, inv.unsqueeze(-1).expand(-1, -1, c))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, hidden={self.hidden}, num_tokens={self.num_tokens}, routing={self.routing}'
