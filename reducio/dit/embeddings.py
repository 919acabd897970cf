"""Fixed embeddings of Reducio-DiT: sin-cos positions (1-D, PixArt 2-D, separable 3-D) and timesteps.

Nothing here has parameters; positions are computed on the fly and never stored in checkpoints
(spec §4.3, §4.4). Layout conventions that are easy to get wrong (spec §12, pitfalls 3 and 4):

* 1-D positions are ``[sin | cos]`` halves, not interleaved;
* 2-D positions put the column (w) code in the first half of the channels and the row (h) code in
  the second half, each axis normalised by its own grid length (PixArt's ``base_size`` rule);
* timestep frequencies are ``[cos | sin]`` (cos first).
"""
from __future__ import annotations

import math

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., dim]`` = [sin(p w_0..w_{dim/2-1}) | cos(...)], w_k = 10000^(-k/(dim/2)); float64 -> float32."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64).unsqueeze(-1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)


def grid_positions(length: int, base_size: float, interpolation: float) -> torch.Tensor:
    """PixArt's per-axis position rule: i / (length / base_size) / interpolation, i = 0..length-1."""
    return torch.arange(length, dtype=torch.float64) / (length / base_size) / interpolation


def sincos_2d(grid_h: int, grid_w: int, dim: int, base_size: float, interpolation: float) -> torch.Tensor:
    """``[grid_h * grid_w, dim]`` in raster order (row-major): [PE1D(pos_w(j)), PE1D(pos_h(i))]."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be a multiple of 4, got {dim}")
    emb_w = sincos_1d(grid_positions(grid_w, base_size, interpolation), dim // 2)  # [gw, D/2]
    emb_h = sincos_1d(grid_positions(grid_h, base_size, interpolation), dim // 2)  # [gh, D/2]
    emb_w = emb_w.unsqueeze(0).expand(grid_h, grid_w, dim // 2)
    emb_h = emb_h.unsqueeze(1).expand(grid_h, grid_w, dim // 2)
    return torch.cat([emb_w, emb_h], dim=-1).reshape(grid_h * grid_w, dim)


def sincos_3d(grid_t: int, grid_h: int, grid_w: int, dim: int, base_size: float, interpolation: float,
              temporal: bool = True) -> torch.Tensor:
    """``[T*H*W, dim]`` in raster order (t, h, w): PE2D(i, j) + PE1D(t, dim) (the latter if ``temporal``)."""
    spatial = sincos_2d(grid_h, grid_w, dim, base_size, interpolation).reshape(1, grid_h * grid_w, dim)
    spatial = spatial.expand(grid_t, grid_h * grid_w, dim)
    if temporal:
        frames = sincos_1d(torch.arange(grid_t, dtype=torch.float64), dim).reshape(grid_t, 1, dim)
        spatial = spatial + frames
    return spatial.reshape(grid_t * grid_h * grid_w, dim)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[B, dim]`` = [cos(t f_k) | sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)); float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32).reshape(-1, 1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
