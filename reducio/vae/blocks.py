"""Building blocks of the Reducio VAE: norms, ResNet blocks, resampling, attention, fusion.

State-dict names follow the official checkpoint layout (see the spec, section 2) so official weights
load strictly. All attention goes through ``torch.nn.functional.scaled_dot_product_attention``;
normalisation layers compute in float32 whatever the weight/activation dtype, because half-precision
group statistics over a whole 16-frame clip are too coarse.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Attention score matrices above this many elements are computed in query chunks. Rows of the
# softmax are independent, so chunking is exact; it only bounds the memory of backends that
# materialise the score matrix (the math fallback, half precision on some CPUs).
MAX_ATTENTION_SCORE_ELEMENTS = 1 << 27


NORM_GROUPS = 32   # the official Normalize(): GroupNorm(32 groups, eps 1e-6)


class FloatGroupNorm(nn.GroupNorm):
    """GroupNorm(32, eps 1e-6) evaluated in float32 and cast back to the input dtype."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS, eps: float = 1e-6):
        super().__init__(num_groups=groups, num_channels=channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension evaluated in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def conv_nd(dims: int, in_ch: int, out_ch: int, kernel, stride=1, padding=0) -> nn.Module:
    if dims == 2:
        return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding)
    if dims == 3:
        return nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding)
    raise ValueError(f"dims must be 2 or 3, got {dims}")


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, dims: int):
        super().__init__()
        self.norm1 = FloatGroupNorm(in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.norm2 = FloatGroupNorm(out_ch)
        self.conv2 = conv_nd(dims, out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = conv_nd(dims, in_ch, out_ch, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


# Resampling kinds. "spatial" halves/doubles H and W only, "temporal" T only, "full" all three;
# "image" is the 2-D stride-2 version used by the content encoder.
SPATIAL, TEMPORAL, FULL, IMAGE = "spatial", "temporal", "full", "image"


class Downsample(nn.Module):
    """Zero-pad right/bottom/end by one, then a valid stride-2 convolution (floor(n/2) outputs)."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        if kind == IMAGE:
            kernel, stride, self.padding = 3, 2, (0, 1, 0, 1)
            self.conv = nn.Conv2d(channels, channels, kernel, stride=stride)
            return
        if kind == SPATIAL:
            kernel, stride, self.padding = (1, 3, 3), (1, 2, 2), (0, 1, 0, 1, 0, 0)
        elif kind == TEMPORAL:
            kernel, stride, self.padding = (3, 1, 1), (2, 1, 1), (0, 0, 0, 0, 0, 1)
        elif kind == FULL:
            kernel, stride, self.padding = (3, 3, 3), (2, 2, 2), (0, 1, 0, 1, 0, 1)
        else:
            raise ValueError(f"unknown downsample kind {kind!r}")
        self.conv = nn.Conv3d(channels, channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class Upsample(nn.Module):
    """Nearest-neighbour up-sampling followed by a 3x3x3 convolution (even when T is kept)."""

    SCALES = {SPATIAL: (1.0, 2.0, 2.0), TEMPORAL: (2.0, 1.0, 1.0), FULL: (2.0, 2.0, 2.0)}

    def __init__(self, channels: int, kind: str):
        super().__init__()
        if kind not in self.SCALES:
            raise ValueError(f"unknown upsample kind {kind!r}")
        self.scale = self.SCALES[kind]
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [batch, heads, tokens, d] tensors, chunked over queries."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    per_query = batch * heads * n_k
    if per_query * n_q <= MAX_ATTENTION_SCORE_ELEMENTS:
        return F.scaled_dot_product_attention(q, k, v)
    chunk = max(1, MAX_ATTENTION_SCORE_ELEMENTS // per_query)
    return torch.cat(
        [F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v) for i in range(0, n_q, chunk)],
        dim=2,
    )


def split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> [B, heads, N, d] (head-major channel split)."""
    b, n, c = tokens.shape
    return tokens.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    b, h, n, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, n, h * d)


def _pad_to_multiple(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Zero-pad the last two axes on the right/bottom up to multiples of ``window``."""
    h, w = x.shape[-2:]
    pad_h = (window[0] - h % window[0]) % window[0]
    pad_w = (window[1] - w % window[1]) % window[1]
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _windows(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """[B, C, (T,) nh*wh, nw*ww] -> [B*nh*nw, C, (T,) wh, ww] (window-major, row-major order)."""
    wh, ww = window
    if x.ndim == 4:
        b, c, hh, wd = x.shape
        x = x.view(b, c, hh // wh, wh, wd // ww, ww).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, c, wh, ww)
    b, c, t, hh, wd = x.shape
    x = x.view(b, c, t, hh // wh, wh, wd // ww, ww).permute(0, 3, 5, 1, 2, 4, 6)
    return x.reshape(-1, c, t, wh, ww)


def _unwindow(x: torch.Tensor, batch: int, n_h: int, n_w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`."""
    if x.ndim == 4:
        _, c, wh, ww = x.shape
        x = x.view(batch, n_h, n_w, c, wh, ww).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, c, n_h * wh, n_w * ww)
    _, c, t, wh, ww = x.shape
    x = x.view(batch, n_h, n_w, c, t, wh, ww).permute(0, 3, 4, 1, 5, 2, 6)
    return x.reshape(batch, c, t, n_h * wh, n_w * ww)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, ...spatial] -> [B, N, C] with tokens in (t, h, w) order."""
    return x.flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """8-head self-attention over all (t, h, w) positions; q/k/v/proj_out are 1x1 convs with bias.

    The residual is added to the un-normalised input. For 2-D inputs with more than ``window``
    positions the attention runs in zero-padded non-overlapping windows, as the official content
    encoder does (the padded positions go through the biased q/k/v convs and take part in the
    softmax). The official 3-D window branch crashes, so 3-D inputs always use global attention.
    """

    def __init__(self, channels: int, dims: int, heads: int = 8, window: Sequence[int] = (256, 256)):
        super().__init__()
        self.dims = dims
        self.heads = heads
        self.window = tuple(window)
        self.norm = FloatGroupNorm(channels)
        self.q = conv_nd(dims, channels, channels, 1)
        self.k = conv_nd(dims, channels, channels, 1)
        self.v = conv_nd(dims, channels, channels, 1)
        self.proj_out = conv_nd(dims, channels, channels, 1)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        q, k, v = (split_heads(_tokens(conv(h)), self.heads) for conv in (self.q, self.k, self.v))
        out = merge_heads(attention(q, k, v))
        return out.transpose(1, 2).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        if self.dims == 2 and height * width > self.window[0] * self.window[1]:
            padded = _pad_to_multiple(h, self.window)
            n_h, n_w = padded.shape[-2] // self.window[0], padded.shape[-1] // self.window[1]
            out = self._attend(_windows(padded, self.window))
            out = _unwindow(out, h.shape[0], n_h, n_w)[..., :height, :width]
        else:
            out = self._attend(h)
        return x + self.proj_out(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from video tokens, keys/values from content tokens.

    ``to_q``/``to_k``/``to_v`` have no bias, ``to_out.0`` has one. When the content map has more
    than ``window`` positions and the video map at least that many per frame, attention is
    restricted to matching windows (spec 3.4): the content is zero-padded and cut into windows of
    ``window``; the video into windows scaled by the size ratio (all frames of a window together).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int = 64,
                 window: Sequence[int] = (128, 128)):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.window = tuple(window)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def _attend_tokens(self, x_tokens: torch.Tensor, ctx_tokens: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.to_q(x_tokens), self.heads)
        k = split_heads(self.to_k(ctx_tokens), self.heads)
        v = split_heads(self.to_v(ctx_tokens), self.heads)
        return merge_heads(attention(q, k, v))

    def uses_windows(self, video_hw: Sequence[int], context_hw: Sequence[int]) -> bool:
        wh, ww = self.window
        return context_hw[0] * context_hw[1] > wh * ww and video_hw[0] * video_hw[1] >= wh * ww

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, T, H, W] (already normalised), context [B, Cc, Hc, Wc] -> tokens [B, T*H*W, C]."""
        batch, _, frames, height, width = x.shape
        ctx_h, ctx_w = context.shape[-2:]
        if not self.uses_windows((height, width), (ctx_h, ctx_w)):
            out = self._attend_tokens(_tokens(x), _tokens(context))
            return self.to_out[0](out)
        wh, ww = self.window
        video_window = (math.ceil(float(wh) * height / ctx_h), math.ceil(float(ww) * width / ctx_w))
        context_p = _pad_to_multiple(context, self.window)
        x_p = _pad_to_multiple(x, video_window)
        n_h, n_w = x_p.shape[-2] // video_window[0], x_p.shape[-1] // video_window[1]
        n_ctx = (context_p.shape[-2] // wh) * (context_p.shape[-1] // ww)
        if n_ctx != n_h * n_w:
            raise ValueError(
                f"windowed cross-attention: the video map {height}x{width} gives {n_h * n_w} windows "
                f"but the content map {ctx_h}x{ctx_w} gives {n_ctx}; use tiling or a larger window")
        x_win = _tokens(_windows(x_p, video_window))
        ctx_win = _tokens(_windows(context_p, self.window))
        out = self._attend_tokens(x_win, ctx_win)
        out = out.transpose(1, 2).reshape(-1, out.shape[-1], frames, *video_window)
        out = _unwindow(out, batch, n_h, n_w)[..., :height, :width]
        return self.to_out[0](_tokens(out))


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """Interleaved sin/cos table [positions, dim]: angle(t, j) = t / 10000^(2*floor(j/2)/dim).

    Computed in float64 like the official table, returned as float32 on the default device
    (so that models built under ``torch.device("meta")`` stay entirely on the meta device).
    """
    pos = np.arange(positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angles = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)


def plane_position_table(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin/cos position code [height * width, dim] in (h, w) token order.

    Positions are measured in fractions of the map ((i + 0.5) / size), so maps of different sizes
    that show the same frame (video features and content features at another level) get the same
    code at the same place. The first half of the channels codes y, the second x; each half holds
    sin/cos pairs of frequencies from 0.5 to 16 cycles per frame, spaced geometrically (a shift
    of the position is a rotation of each pair, i.e. linear, which cross-attention can learn).
    """
    pairs = dim // 4
    table = torch.zeros(height * width, dim, dtype=torch.float64)
    if pairs == 0:
        return table.float()
    freqs = 0.5 * torch.pow(torch.tensor(32.0, dtype=torch.float64),
                            torch.arange(pairs, dtype=torch.float64) / max(1, pairs - 1))
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    for axis, coords in enumerate((gy.reshape(-1), gx.reshape(-1))):
        angles = 2 * math.pi * coords[:, None] * freqs[None, :]
        start = axis * 2 * pairs
        table[:, start:start + 2 * pairs:2] = angles.sin()
        table[:, start + 1:start + 2 * pairs:2] = angles.cos()
    return table.float()


class FusionBlock(nn.Module):
    """The fusion block (official ``BasicTransformerBlock``): y = x + pe + CrossAttn(LN(x + pe), ctx).

    ``pe`` is a fixed time-only sinusoid table (one row per frame), stored as a non-trainable
    parameter ``pos_embed`` [1, frames, 1, dim] so that it is part of the state dict. The content
    features are used raw (no normalisation). Heads = max(1, dim // 64) of width 64.
    """

    def __init__(self, dim: int, context_dim: int, frames: int, dim_head: int = 64,
                 window: Sequence[int] = (128, 128), plane_position: bool = False):
        super().__init__()
        self.frames = frames
        self.plane_position = plane_position
        heads = max(1, dim // dim_head)
        self.attn = CrossAttention(dim, context_dim, heads, dim_head, window)
        self.norm = FloatLayerNorm(dim)
        table = sinusoid_table(frames, dim)[None, :, None, :]
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, dim, frames, height, width = x.shape
        if frames != self.frames:
            raise ValueError(
                f"fusion block expects {self.frames} frames at this level but got {frames}: Reducio "
                f"decodes fixed 16-frame clips (latent T must be temp_res / 2^f_t)")
        # [1, T, 1, C] -> [1, C, T, 1, 1], broadcast over batch and space.
        pe = self.pos_embed[0, :, 0, :].t()[None, :, :, None, None].to(x.dtype)
        x = x + pe
        tokens = _tokens(x)
        normed = self.norm(tokens)
        context = context.to(x.dtype)
        if self.plane_position:
            # not in the official models (ddconfig.content_position): the same 2-D code on the
            # queries (every frame) and on the content tokens, so a query can find "its" place
            code = plane_position_table(height, width, dim).to(x.device, x.dtype)
            normed = normed + code.repeat(frames, 1)[None]
            ctx_h, ctx_w = context.shape[-2:]
            ctx_code = plane_position_table(ctx_h, ctx_w, context.shape[1]).to(x.device, x.dtype)
            context = context + ctx_code.t().reshape(1, -1, ctx_h, ctx_w)
        normed = normed.transpose(1, 2).reshape(batch, dim, frames, height, width)
        out = self.attn(normed, context)
        return x + out.transpose(1, 2).reshape(batch, dim, frames, height, width)


class AddFusion(nn.Module):
    """The official ``AddFusion`` (fuse_type 'add'): y = x + SiLU(GN(conv3d(x + conv2d(ctx) + e_t))).

    ``conv_context`` (3x3 Conv2d) maps the content features to the video width and is broadcast over
    time; ``temp_embed`` [1, dim, frames, 1, 1] is a learned per-frame bias; ``conv`` is a 3x3x3
    Conv3d. The content map must have the video features' spatial size (same level).

    Initialisation differs from the official code on purpose: the official ``zero_init`` zeroes both
    convolutions *and* the norm's weight and bias, which leaves the branch unable to learn (the norm
    sees a constant 0, so neither its weight nor the convolutions ever get a gradient; only the norm
    bias moves). Zeroing only the norm weight would learn, but Adam opens such a gate by about one
    learning rate per step (measured: 0.03 after 100 steps at 4e-4), so the content would reach the
    decoder only after thousands of steps. Here the convolutions and the norm keep PyTorch's default
    initialisation: the content frame enters from the first step. Loading official or trained
    weights is unaffected (same keys and shapes).
    """

    def __init__(self, dim: int, context_dim: int, frames: int):
        super().__init__()
        self.frames = frames
        self.conv_context = nn.Conv2d(context_dim, dim, 3, padding=1)
        self.temp_embed = nn.Parameter(torch.zeros(1, dim, frames, 1, 1))
        self.conv = nn.Conv3d(dim, dim, 3, padding=1)
        self.norm = FloatGroupNorm(dim)
        nn.init.trunc_normal_(self.temp_embed, std=0.02)

    def _check(self, x: torch.Tensor, context: torch.Tensor) -> None:
        frames = x.shape[2]
        if frames != self.frames:
            raise ValueError(f"add-fusion block expects {self.frames} frames at this level but got {frames}")
        if context.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"add fusion needs content features of the video features' size {tuple(x.shape[-2:])}, "
                             f"got {tuple(context.shape[-2:])}: set ch_fuse of this level to the content level of "
                             f"the same resolution")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self._check(x, context)
        ctx = self.conv_context(context.to(x.dtype)).unsqueeze(2)
        out = self.conv(x + ctx + self.temp_embed.to(x.dtype))
        return x + F.silu(self.norm(out))


def interpolate_linear(values: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``values`` resampled to ``size`` entries along ``dim``, linearly between the old entries' centres and
    *extrapolated* beyond the first and last (align_corners=False geometry: entry i covers the i-th equal
    part of the axis), where ``F.interpolate`` holds the end values."""
    count = values.shape[dim]
    if count == size:
        return values
    if count == 1:
        return values.expand(*values.shape[:dim], size, *values.shape[dim + 1:])
    position = (torch.arange(size, dtype=torch.float32, device=values.device) + 0.5) * count / size - 0.5
    lower = position.floor().clamp(0, count - 2).long()
    weight = (position - lower).to(values.dtype).reshape(size, *[1] * (values.ndim - dim - 1))
    start, end = values.index_select(dim, lower), values.index_select(dim, lower + 1)
    return start + (end - start) * weight


def linear_flow(flow: torch.Tensor, size: Sequence[int], space: bool = True) -> torch.Tensor:
    """A flow [B, 2, T, H, W] in pixels resampled to ``size`` (T', H', W') by :func:`interpolate_linear` along
    time and, with ``space``, along H and W (values rescaled to the new pixels); without ``space`` H and W
    must stay. ``motion_interpolation`` 'linear' (motion.py): a steady motion (a pan, a sprite's glide)
    comes back exact in every frame, and a zoom or roll, measured as one shift per latent cell, becomes
    the linear field it is, out to the frame's edges."""
    flow = interpolate_linear(flow, 2, int(size[0]))
    if not space:
        if tuple(flow.shape[3:]) != tuple(size[1:]):
            raise ValueError(f"linear_flow(space=False) keeps the flow's size {tuple(flow.shape[3:])}, not {tuple(size[1:])}")
        return flow
    scale = torch.tensor([size[2] / flow.shape[4], size[1] / flow.shape[3]], dtype=flow.dtype, device=flow.device)
    flow = interpolate_linear(interpolate_linear(flow, 3, int(size[1])), 4, int(size[2]))
    return flow * scale.reshape(1, 2, 1, 1, 1)


def resize_flow(flow: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """A flow [B, 2, T, H, W] in pixels resampled to ``size`` (T', H', W'), values rescaled to the new pixels.
    ``mode`` 'nearest' keeps a per-cell flow (object motion) piecewise constant."""
    if tuple(flow.shape[2:]) == tuple(size):
        return flow
    scale = torch.tensor([size[2] / flow.shape[4], size[1] / flow.shape[3]], dtype=flow.dtype, device=flow.device)
    resized = (F.interpolate(flow, size=tuple(size), mode="nearest-exact") if mode == "nearest" else
               F.interpolate(flow, size=tuple(size), mode="trilinear", align_corners=False))
    return resized * scale.reshape(1, 2, 1, 1, 1)


def warp_frames(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` [B, C, H, W] moved once per frame: out[:, :, t, y, x] = image at (x, y) + flow[:, :, t, y, x].

    Backward warping with bilinear sampling; ``flow`` [B, 2, T, H, W] is (dx, dy) in pixels. Sampling
    outside the image repeats its border. A zero flow returns the image exactly.
    """
    batch, channels, height, width = image.shape
    frames = flow.shape[2]
    xs = (torch.arange(width, device=flow.device, dtype=flow.dtype) + 0.5) * (2 / width) - 1
    ys = (torch.arange(height, device=flow.device, dtype=flow.dtype) + 0.5) * (2 / height) - 1
    grid = torch.stack([xs.reshape(1, 1, 1, width) + flow[:, 0] * (2 / width),
                        ys.reshape(1, 1, height, 1) + flow[:, 1] * (2 / height)], dim=-1)   # [B, T, H, W, 2]
    source = image[:, None].expand(batch, frames, channels, height, width).reshape(batch * frames, channels,
                                                                                   height, width)
    out = F.grid_sample(source, grid.reshape(batch * frames, height, width, 2).to(source.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.reshape(batch, frames, channels, height, width).transpose(1, 2)


class WarpFusion(AddFusion):
    """fuse_type 'warp' (ours, not in any official model): an ``AddFusion`` whose content features are
    first moved, frame by frame, by a flow predicted from the video features.

    Why: a content frame added in place (``AddFusion``) gives a decoder no easy way to move it. Trained
    that way the tiny model learned to repeat the content frame -- every reconstruction was a still
    picture, whatever the clip's motion (docs/embedded_models.md). A flow is the motion itself.

    ``flow`` (3x3x3 Conv3d -> (dx, dy) in pixels of this level) starts small: PyTorch's default
    initialisation scaled by ``FLOW_INIT_SCALE``, which moves the content by about 0.05 pixel -- nearly
    the add fusion of the same weights (an add-fusion level's trained weights load into it). Not zero:
    a zero flow layer passes no gradient back to the video features, so the encoder is never asked to
    put the motion into the latent and the flow layer's own gradient, without motion in its input,
    averages to nothing (measured: a zero-initialised flow stayed below 0.01 pixel for 150 steps and
    every reconstruction stayed still). Warp levels are coarse-to-fine: each adds its flow to the
    previous (coarser) warp level's, resampled to this level (``forward``'s ``prior_flow``), so large
    motions are found at low resolution and refined above. Returns (features, flow).
    """

    FLOW_INIT_SCALE = 0.1

    def __init__(self, dim: int, context_dim: int, frames: int, objects: bool = False):
        super().__init__(dim, context_dim, frames)
        self.flow = nn.Conv3d(dim, 2, 3, padding=1)
        with torch.no_grad():
            self.flow.weight.mul_(self.FLOW_INIT_SCALE)
            self.flow.bias.zero_()
        if objects:
            # ours (latent_motion 'measured+objects', motion.py): the content moved a second time, by this
            # level's flow plus the cell's object flow, added through its own convolution. The decoder
            # learns which pixels take that second picture (an object where it is now) and which the
            # first (the background). Zero-initialised: a model trained without it starts unchanged,
            # and its weights still get a gradient (the moved content is not zero).
            self.conv_objects = nn.Conv2d(context_dim, dim, 3, padding=1)
            nn.init.zeros_(self.conv_objects.weight)
            nn.init.zeros_(self.conv_objects.bias)

    def _moved_context(self, context: torch.Tensor, flow: torch.Tensor, conv: nn.Module,
                       dtype: torch.dtype) -> torch.Tensor:
        batch, _, frames, height, width = flow.shape
        moved = warp_frames(context.float(), flow).to(dtype)                        # [B, C, T, H, W]
        moved = moved.transpose(1, 2).reshape(batch * frames, -1, height, width)
        return conv(moved).reshape(batch, frames, -1, height, width).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, prior_flow: torch.Tensor | None = None,
                object_flow: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``object_flow`` [B, 2, T', h, w]: one value per object cell, in pixels of that grid (a model with
        ``conv_objects`` only)."""
        self._check(x, context)
        flow = self.flow(x).float()
        if prior_flow is not None:
            flow = flow + resize_flow(prior_flow.float(), flow.shape[2:])
        ctx = self._moved_context(context, flow, self.conv_context, x.dtype)
        if object_flow is not None:
            objects = resize_flow(object_flow.float(), flow.shape[2:], mode="nearest")
            ctx = ctx + self._moved_context(context, flow + objects, self.conv_objects, x.dtype)
        out = self.conv(x + ctx + self.temp_embed.to(x.dtype))
        return x + F.silu(self.norm(out)), flow


class LatentFlow(nn.Module):
    """The coarsest flow of a decoder with warp levels, read straight off the latent (ours): the first
    two channels of the decoder's input (after ``post_quant_conv``) times ``SCALE``, as (dx, dy) in
    latent pixels (one is 2**f_s output pixels). No weights of its own.

    Why: with the flow only at the warp levels, the path from the latent to the flow runs through the
    whole lower decoder, and a decoder that already repeats the content frame never learns to put
    motion into the latent (measured: 300 more steps with warp levels alone left the flows unrelated
    to the clip and every reconstruction still). A learned read-out does not help either: while the
    latent holds no motion, its best weights are zero, and Adam takes weights of a tenth of the
    default initialisation there in about ten steps (measured), after which no gradient reaches the
    encoder. This read-out has no weights to lose; but measured, ``post_quant_conv`` (and the
    encoder's ``quant_conv``) can still make these two channels constant while the encoder sees no
    motion, so on the tiny model it did not learn motion either; the tiny preset therefore measures
    the motion into the latent instead (``latent_motion: "measured"``, motion.py: the decoder then gets
    its coarsest flow from :func:`motion.read_motion_flow` and this read-out is not used). ``SCALE``
    makes one unit an eighth of a latent pixel (4 output pixels at f_s = 5), the size of the motions.
    """

    SCALE = 1 / 8

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :2].float() * self.SCALE
