"""The two encoders: the 3-D video encoder (motion latent) and the 2-D content encoder.

Both are built by one class following the official structural rules (spec section 4) so that the
tiny golden model and the full ft4/ft2 models come out of the same code.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (FULL, IMAGE, SPATIAL, TEMPORAL, Downsample, FloatGroupNorm, ResnetBlock,
                     SelfAttention, conv_nd)


def encoder_downsample_kind(level: int, n_levels: int, f_s: int, f_t: int) -> Optional[str]:
    """Kind of the downsample after encoder level ``level`` (None = no downsample).

    The last f_t downsamples are the temporal ones; earlier ones are spatial only.
    """
    if level == n_levels - 1 or level < n_levels - 1 - max(f_s, f_t):
        return None
    if f_s > f_t and level < n_levels - f_t - 1:
        return SPATIAL
    if f_t > f_s and level < n_levels - f_s - 1:
        return TEMPORAL
    return FULL


def _as_window(window) -> tuple:
    return (window, window) if isinstance(window, int) else tuple(window)


class Encoder(nn.Module):
    """Down-sampling conv encoder (official ``Encoder``), in 3-D (video) or 2-D (content) mode.

    3-D mode (``out_z``): returns the posterior moments' pre-image [B, 2*z_channels, T', h, w].
    2-D mode: :meth:`content_features` returns the per-level features taken before each level's
    downsample plus the output of ``mid.block_1 -> mid.attn_1``. ``mid.block_2`` and ``norm_out``
    exist (their weights are in the official checkpoints) but are not run in 2-D mode, because the
    official forward discards their result.
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, in_channels: int = 3,
                 z_channels: int = 16, dims: int = 3, f_t: int = 0, f_s: Optional[int] = None,
                 out_z: bool = True, double_z: bool = True, window_size=(256, 256)):
        super().__init__()
        self.dims = dims
        self.n_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.out_z = out_z
        f_s = self.n_levels - 1 if f_s is None else f_s
        self.f_s, self.f_t = f_s, f_t
        window = _as_window(window_size)

        self.conv_in = conv_nd(dims, in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.n_levels):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            block_in = ch * in_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dims))
                block_in = block_out
            kind = encoder_downsample_kind(level, self.n_levels, f_s, f_t)
            if kind is not None:
                stage.downsample = Downsample(block_in, IMAGE if dims == 2 else kind)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dims)
        self.mid.attn_1 = SelfAttention(block_in, dims, heads=8, window=window)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dims)
        self.norm_out = FloatGroupNorm(block_in)
        if out_z:
            out_ch = 2 * z_channels if double_z else z_channels
            self.conv_out = conv_nd(dims, block_in, out_ch, 3, padding=1)

    def _levels(self, x: torch.Tensor, collect: Optional[list]) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if collect is not None:
                collect.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> [B, 2*z_channels, T', H/2^f_s, W/2^f_s]."""
        if not self.out_z:
            raise RuntimeError("this encoder has no conv_out; call content_features()")
        h = self._levels(x, None)
        h = self.mid.attn_1(self.mid.block_1(h))
        h = self.mid.block_2(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def content_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image [B, 3, H, W] -> list of per-level features + the mid feature (last entry)."""
        features: list[torch.Tensor] = []
        h = self._levels(x, features)
        features.append(self.mid.attn_1(self.mid.block_1(h)))
        return features
