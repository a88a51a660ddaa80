"""MambaIRv2 and MambaIRv2Light (Guo et al., CVPR 2025; spec 2).

Checkpoint-compatible with the official ``basicsr/archs/mambairv2_arch.py`` and
``mambairv2light_arch.py`` (strict=True, including the int64 buffer ``relative_position_index_SA``):
same constructor arguments and defaults, parameter names and shapes, and forward. The two networks
differ only by the feed-forward network of their layers (:class:`ConvFFN` vs :class:`GatedMLP`).

Structure: conv3x3 stem -> ``layers.{i}`` (:class:`ASSB`: residual groups of :class:`AttentiveLayer`:
shifted-window attention + FFN, then :class:`~.assm.ASSM` + FFN) -> LayerNorm -> conv -> head.
Inputs of any size: the image is mirror-padded to a multiple of ``window_size`` inside ``forward``
and the output cropped back, as officially.

Heads (``upsampler``, :mod:`.heads`, shared with MambaIR): ``'pixelshuffle'`` (classic SR),
``'pixelshuffledirect'`` (light SR), ``'nearest+conv'`` (x4 only: two nearest x2 upsamplings with convs),
anything else (``''``): denoising / JPEG CAR, ``out = x + conv_last(features)``.

Routing (see :mod:`.assm`): ``routing=None`` routes with Gumbel noise in ``train()`` and
deterministically in ``eval()``; ``'deterministic'`` / ``'gumbel'`` force one mode in both.
``net.routing = ...`` changes it for every layer after construction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from .arch_util import map_to_tokens, tokens_to_map
from .assm import ASSM, check_routing
from .heads import add_head, apply_head
from .mambair_arch import RGB_MEAN, MambaIR, PatchEmbed, make_resi_connection
from .window_attention import (
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

LAYER_SCALE_INIT = 1e-4  # initial value of the AttentiveLayer scales scale1 / scale2


def mirror_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``multiple`` with its mirror image.

    As the official ``cat([x, flip(x)])[:h]`` (edge row/column repeated, i.e. numpy's 'symmetric'; torch's
    'reflect' does not repeat the edge). For pads larger than the side, which the official code cannot do,
    the mirroring repeats periodically.
    """
    for dim in (2, 3):
        size = -(-x.shape[dim] // multiple) * multiple
        while x.shape[dim] < size:
            x = torch.cat([x, x.flip(dim)], dim=dim)
        x = x.narrow(dim, 0, size)
    return x


class ConvFFN(nn.Module):
    """MambaIRv2 FFN: ``fc2(g + GELU(dwconv(g)))`` with ``g = GELU(fc1(x))`` (spec 2.8).

    Keys: ``fc1``, ``dwconv.depthwise_conv.0`` (depthwise k x k on the hidden map), ``fc2``.
    """

    def __init__(self, in_features: int, hidden_features: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.dwconv = DWConv(hidden_features, kernel_size)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """x: (B, H*W, C); x_size: (H, W). Returns (B, H*W, C)."""
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x, x_size))


class DWConv(nn.Module):
    """GELU(depthwise conv k x k) on tokens (key ``depthwise_conv.0``)."""

    def __init__(self, hidden_features: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(hidden_features, hidden_features, kernel_size, 1, (kernel_size - 1) // 2, groups=hidden_features),
            nn.GELU())

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """(B, H*W, C) -> (B, H*W, C)."""
        return map_to_tokens(self.depthwise_conv(tokens_to_map(x, x_size)))


class Gate(nn.Module):
    """Spatial gate of GatedMLP: ``x1 * dwconv5x5(LN(x2))`` for the two channel halves (keys ``norm``, ``conv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """(B, H*W, 2C) -> (B, H*W, C)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * map_to_tokens(self.conv(tokens_to_map(self.norm(x2), x_size)))


class GatedMLP(nn.Module):
    """MambaIRv2Light FFN: ``fc2(Gate(GELU(fc1(x))))``; fc2 reads half the hidden channels (spec 2.8).

    Keys: ``fc1``, ``sg.norm``, ``sg.conv``, ``fc2``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.sg = Gate(hidden_features // 2)
        self.fc2 = nn.Linear(hidden_features // 2, out_features)

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        """x: (B, H*W, C); x_size: (H, W). Returns (B, H*W, C)."""
        return self.fc2(self.sg(self.act(self.fc1(x)), x_size))


class AttentiveLayer(nn.Module):
    """One MambaIRv2 block: (shifted) window attention + FFN, then ASSM + FFN (spec 2.4).

    Both halves keep the official double shortcut: ``x = shortcut * scale + (branch + shortcut + FFN)``.

    Args:
        dim: channels C.
        d_state: SSM state size N.
        num_heads: attention heads.
        window_size: attention window side ws.
        shift_size: 0 or ws // 2 (the windows of odd layers are shifted).
        inner_rank, num_tokens: prompt pool rank and size (see :class:`ASSM`).
        convffn_kernel_size: depthwise kernel of :class:`ConvFFN`.
        mlp_ratio: FFN and ASSM hidden width ratio.
        qkv_bias: bias of ``wqkv``.
        gated_ffn: :class:`GatedMLP` (light model) instead of :class:`ConvFFN`.
        routing: ASSM routing mode (see :mod:`.assm`).
    """

    def __init__(self, dim: int, d_state: int, num_heads: int, window_size: int, shift_size: int, inner_rank: int,
                 num_tokens: int, convffn_kernel_size: int, mlp_ratio: float, qkv_bias: bool = True,
                 gated_ffn: bool = False, routing: str | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.scale1 = nn.Parameter(LAYER_SCALE_INIT * torch.ones(dim))
        self.scale2 = nn.Parameter(LAYER_SCALE_INIT * torch.ones(dim))
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.win_mhsa = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias)
        self.assm = ASSM(dim, d_state, num_tokens=num_tokens, inner_rank=inner_rank, mlp_ratio=mlp_ratio,
                         routing=routing)
        if gated_ffn:
            self.convffn1 = GatedMLP(dim, hidden, dim)
            self.convffn2 = GatedMLP(dim, hidden, dim)
        else:
            self.convffn1 = ConvFFN(dim, hidden, convffn_kernel_size)
            self.convffn2 = ConvFFN(dim, hidden, convffn_kernel_size)
        # The per-layer factor of the ASSM prompt pool (embeddingB @ embeddingA).
        self.embeddingA = nn.Embedding(inner_rank, d_state)
        nn.init.uniform_(self.embeddingA.weight, -1 / inner_rank, 1 / inner_rank)

    def window_attention(self, x: torch.Tensor, x_size: Sequence[int], params: dict) -> torch.Tensor:
        """Shifted-window MHSA of normalised tokens x (B, L, C) -> (B, L, C)."""
        b, _, c = x.shape
        h, w = x_size
        ws, s = self.window_size, self.shift_size
        qkv = self.wqkv(x).reshape(b, h, w, 3 * c)
        if s > 0:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(qkv, ws).reshape(-1, ws * ws, 3 * c)
        attn = self.win_mhsa(windows, rpi=params['rpi_sa'], mask=params['attn_mask'] if s > 0 else None)
        out = window_reverse(attn.view(-1, ws, ws, c), ws, h, w)
        if s > 0:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def forward(self, x: torch.Tensor, x_size: Sequence[int], params: dict) -> torch.Tensor:
        """x: (B, H*W, C); x_size: (H, W); params: ``attn_mask`` (nW, ws^2, ws^2), ``rpi_sa`` (ws^2, ws^2)."""
        shortcut = x
        x_win = self.window_attention(self.norm1(x), x_size, params) + shortcut
        x_win = self.convffn1(self.norm2(x_win), x_size) + x_win
        x = shortcut * self.scale1 + x_win  # the shortcut enters twice (official)

        shortcut = x
        x_aca = self.assm(self.norm3(x), x_size, self.embeddingA) + x
        x = x_aca + self.convffn2(self.norm4(x_aca), x_size)
        return shortcut * self.scale2 + x


class BasicBlock(nn.Module):
    """``depth`` AttentiveLayers, every second one with shifted windows (keys ``layers.{j}.*``).

    Args: see :class:`AttentiveLayer`; ``use_checkpoint`` recomputes each layer in the backward pass
    (activation memory for compute; the recomputation replays the same Gumbel noise).
    """

    def __init__(self, dim: int, depth: int, d_state: int, num_heads: int, window_size: int, inner_rank: int,
                 num_tokens: int, convffn_kernel_size: int, mlp_ratio: float, qkv_bias: bool = True,
                 use_checkpoint: bool = False, gated_ffn: bool = False, routing: str | None = None) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.layers = nn.ModuleList(
            AttentiveLayer(dim, d_state, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, inner_rank,
                           num_tokens, convffn_kernel_size, mlp_ratio, qkv_bias=qkv_bias, gated_ffn=gated_ffn,
                           routing=routing)
            for j in range(depth))

    def forward(self, x: torch.Tensor, x_size: Sequence[int], params: dict) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        for layer in self.layers:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, x_size, params, use_reentrant=False)
            else:
                x = layer(x, x_size, params)
        return x


class ASSB(nn.Module):
    """Attentive state-space group: ``x + conv(BasicBlock(x))`` (keys ``residual_group.*``, ``conv.*``)."""

    def __init__(self, dim: int, depth: int, resi_connection: str = '1conv', **block_kwargs) -> None:
        super().__init__()
        self.residual_group = BasicBlock(dim, depth, **block_kwargs)
        self.conv = make_resi_connection(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: Sequence[int], params: dict) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        y = tokens_to_map(self.residual_group(x, x_size, params), x_size)
        return map_to_tokens(self.conv(y)) + x


@ARCH_REGISTRY.register()
class MambaIRv2(nn.Module):
    """MambaIRv2: "Attentive State Space Restoration" (Guo et al., CVPR 2025).

    Args (official names and defaults):
        img_size: recorded only (and the size of ``absolute_pos_embed`` when ``ape``).
        patch_size: recorded only.
        in_chans: input = output channels (1 for CAR, 3 otherwise).
        embed_dim: feature width C.
        d_state: SSM state size N.
        depths: layers per group; ``len(depths)`` groups.
        num_heads: attention heads per group.
        window_size: attention window side (the input is mirror-padded to a multiple of it).
        inner_rank: rank of the prompt pool.
        num_tokens: number of prompt classes of the routing.
        convffn_kernel_size: depthwise kernel of the ConvFFN (ignored by MambaIRv2Light).
        mlp_ratio: FFN / ASSM width ratio.
        qkv_bias: bias of the attention's qkv projection.
        norm_layer: norm of the patch embedding and the final norm.
        ape: add a learned absolute position embedding (then the padded input must be ``img_size``).
        patch_norm: layer-normalise the embedded tokens.
        use_checkpoint: activation checkpointing per layer (training memory; officially unused).
        upscale: SR factor (1 for denoising / CAR; 4 for ``'nearest+conv'``).
        img_range: inputs are scaled by this after mean subtraction.
        upsampler: ``'pixelshuffle'``, ``'pixelshuffledirect'``, ``'nearest+conv'`` or ``''`` (DN / CAR).
        resi_connection: ``'1conv'`` or ``'3conv'``.
        routing: ASSM routing (not official): None (gumbel in train, deterministic in eval),
            ``'deterministic'`` or ``'gumbel'``; also settable later through :attr:`routing`.
        **kwargs: ignored, as officially.

    Shapes: (B, in_chans, H, W) -> (B, in_chans, upscale*H, upscale*W).
    """

    GATED_FFN = False  # MambaIRv2Light: GatedMLP instead of ConvFFN

    def __init__(self, img_size: int | Sequence[int] = 64, patch_size: int | Sequence[int] = 1, in_chans: int = 3,
                 embed_dim: int = 48, d_state: int = 8, depths: Sequence[int] = (6, 6, 6, 6),
                 num_heads: Sequence[int] = (4, 4, 4, 4), window_size: int = 16, inner_rank: int = 32,
                 num_tokens: int = 64, convffn_kernel_size: int = 5, mlp_ratio: float = 2.0, qkv_bias: bool = True,
                 norm_layer: type[nn.Module] = nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, upscale: int = 2, img_range: float = 1.0, upsampler: str | None = '',
                 resi_connection: str = '1conv', routing: str | None = None, **kwargs) -> None:
        super().__init__()
        if len(num_heads) < len(depths):
            raise ValueError(f'num_heads needs one entry per group: {len(depths)} groups, got {list(num_heads)}')
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.window_size = window_size
        self.ape = ape
        self.patch_norm = patch_norm
        self.upscale = upscale
        self.img_range = img_range
        self.upsampler = upsampler or ''
        self.resi_connection = resi_connection
        # Not a buffer (not in the official state dict); see MambaIR.
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        # A persistent buffer: official checkpoints contain it, so strict loading needs the key.
        self.register_buffer('relative_position_index_SA', relative_position_index(window_size))

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep features
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim, norm_layer if patch_norm else None)
        if ape:
            side = img_size if isinstance(img_size, int) else img_size[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, (side // patch_size) ** 2, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            ASSB(embed_dim, depth, resi_connection=resi_connection, d_state=d_state, num_heads=num_heads[i],
                 window_size=window_size, inner_rank=inner_rank, num_tokens=num_tokens,
                 convffn_kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                 use_checkpoint=use_checkpoint, gated_ffn=self.GATED_FFN, routing=routing)
            for i, depth in enumerate(self.depths))
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = make_resi_connection(embed_dim, resi_connection)

        # 3. reconstruction head
        add_head(self, self.upsampler, embed_dim, in_chans, upscale)

        self.apply(MambaIR._init_weights)

    @property
    def routing(self) -> str | None:
        """ASSM routing of every layer: None (by train/eval mode), ``'deterministic'`` or ``'gumbel'``."""
        modes = {m.routing for m in self.modules() if isinstance(m, ASSM)}
        return modes.pop() if len(modes) == 1 else None

    @routing.setter
    def routing(self, mode: str | None) -> None:
        check_routing(mode)
        for m in self.modules():
            if isinstance(m, ASSM):
                m.routing = mode

    def set_routing(self, mode: str | None) -> MambaIRv2:
        """Set :attr:`routing` and return the network (for chaining)."""
        self.routing = mode
        return self

    def forward_features(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) through all groups; H, W multiples of the window."""
        x_size = x.shape[-2:]
        t = self.patch_embed(x)
        if self.ape:
            if t.shape[1] != self.absolute_pos_embed.shape[1]:
                raise ValueError(f'ape: the padded input has {t.shape[1]} positions, the embedding '
                                 f'{self.absolute_pos_embed.shape[1]} (img_size {self.img_size})')
            t = t + self.absolute_pos_embed
        for layer in self.layers:
            t = layer(t, x_size, params)
        return tokens_to_map(self.norm(t), x_size)

    def routes_deterministically(self) -> bool:
        """Whether a forward now routes some layer without noise (``routing`` and the train/eval mode)."""
        return any(m.active_routing() == 'deterministic' for m in self.modules() if isinstance(m, ASSM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) in [0, 1] -> (B, in_chans, upscale*H, upscale*W) (not clamped).

        With deterministic routing a batch runs one image at a time, so that an image's output does not
        depend on the batch it comes in: batched kernels round differently from unbatched ones (oneDNN's
        3-channel ``conv_first`` does on CPU, cuBLAS/cuDNN may pick other algorithms on GPU), and one ulp
        can flip a near-tie of a routing argmax, which re-sorts the tokens and moves the output by ~1e-3.
        """
        if x.shape[0] > 1 and self.routes_deterministically():
            return torch.cat([self.forward_batch(x[i:i + 1]) for i in range(x.shape[0])])
        return self.forward_batch(x)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The official forward on the whole batch at once (shapes as :meth:`forward`)."""
        h0, w0 = x.shape[-2:]
        x = mirror_pad(x, self.window_size)  # before the normalisation, as officially
        h, w = x.shape[-2:]
        mean = self.mean.to(x)
        x = (x - mean) * self.img_range
        params = {'attn_mask': shifted_window_mask(h, w, self.window_size, self.window_size // 2, x.device),
                  'rpi_sa': self.relative_position_index_SA}

        f = self.conv_first(x)
        f = self.conv_after_body(self.forward_features(f, params)) + f
        x = apply_head(self, self.upsampler, f, x)
        x = x / self.img_range + mean
        return x[..., :h0 * self.upscale, :w0 * self.upscale]


@ARCH_REGISTRY.register()
class MambaIRv2Light(MambaIRv2):
    """MambaIRv2-light: :class:`MambaIRv2` with :class:`GatedMLP` FFNs (``convffn_kernel_size`` is unused)."""

    GATED_FFN = True
