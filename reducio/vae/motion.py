"""Measured motion channels (ours, not in any official model): ``ddconfig["latent_motion"] = "measured"``.

The latent's first two channels hold the clip's global motion, measured by phase correlation of each
frame against the content frame, instead of whatever the encoder learns to put there; the decoder
reads its coarsest flow (``LatentFlow``) from those channels before ``post_quant_conv``, and its warp
levels refine it. The other channels stay learned (sprites, zoom, roll, detail).

Why: trained on reconstruction, the tiny model never learned to put motion into its latent -- six runs
of 150-1000 steps, with a learned or fixed read-out, with a motion hint of weight 0.05 or 1.0, ended
with flows under 0.25 pixel, unrelated to the clip, and every reconstruction still (docs/
embedded_models.md). The decoder uses a flow when it gets one (a fitted global flow took a held-out
pan's L1 error from 0.132 to 0.048), so giving the latent the measurement breaks the standstill, and
the DiT still has to learn to generate these channels from the caption.

Units: one unit is 1/16 of the frame's width (dx) or height (dy), so the same number means the same
motion at every resolution; motions beyond ``MAX_UNITS`` (15 % of the frame) are clipped.

Normalisation: every latent the decoder sees is layer-normalised over (C, T, h, w), by the encoder and
again by the DiT pipeline after sampling. :func:`embed_motion` therefore rescales the learned channels
so that the whole latent already has zero mean and unit variance with the motion channels as
measured; the normalisation then leaves them (almost) unchanged.
"""
from __future__ import annotations

import torch

from ..metrics import phase_shifts

MOTION_CHANNELS = 2
UNITS_PER_FRAME = 16     # one unit = 1/16 of the frame side
MAX_UNITS = 2.4          # 15 % of the frame


def frame_shifts(video: torch.Tensor, content_index: int) -> torch.Tensor:
    """Per frame, the global shift that moves that frame onto the content frame: ``[B, 2, T]`` (dx, dy) in
    pixels -- a backward-warp flow: frame t at (x, y) is near the content frame at (x + dx, y + dy).
    Zero for the content frame itself."""
    batch, _, frames, height, width = video.shape
    moving = video.transpose(1, 2).reshape(batch * frames, -1, height, width)
    content = video[:, :, content_index][:, None].expand(-1, frames, -1, -1, -1).reshape(batch * frames, -1,
                                                                                         height, width)
    shifts = phase_shifts(moving, content).reshape(batch, frames, 2).flip(-1).transpose(1, 2)   # (dx, dy)
    shifts[:, :, content_index] = 0.0
    return shifts


def measure_latent_motion(video: torch.Tensor, content_index: int, latent_frames: int) -> torch.Tensor:
    """The motion channels' values for one clip ``[B, 3, T, H, W]``: ``[B, 2, latent_frames]`` in units,
    the mean of :func:`frame_shifts` over the frames each latent frame covers."""
    batch, _, frames, height, width = video.shape
    shifts = frame_shifts(video, content_index).float()
    grouped = shifts.reshape(batch, 2, latent_frames, frames // latent_frames).mean(-1)
    size = torch.tensor([width, height], dtype=grouped.dtype, device=grouped.device).reshape(1, 2, 1)
    return (grouped * UNITS_PER_FRAME / size).clamp(-MAX_UNITS, MAX_UNITS)


def embed_motion(z: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """``z`` [B, C, T', h, w] with channels 0-1 set to ``motion`` [B, 2, T'] (spread over h, w) and the
    other channels standardised and scaled so the whole latent has zero mean and unit variance (see the
    module docstring); float32."""
    z = z.float()
    batch, channels = z.shape[:2]
    moving = motion.float()[:, :, :, None, None].expand(-1, -1, -1, *z.shape[3:])
    rest = z[:, MOTION_CHANNELS:]
    flat = rest.reshape(batch, -1)
    total, learned = z[0].numel(), flat.shape[1]
    standard = (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True).clamp_min(1e-8)
    motion_sum = moving.reshape(batch, -1).sum(1, keepdim=True)
    motion_square = moving.reshape(batch, -1).pow(2).sum(1, keepdim=True)
    shift = -motion_sum / learned
    # MAX_UNITS keeps the motion's share of the variance at most 2 * 2.4^2 / C = 0.72 (C >= 16, config.py)
    scale = ((total - motion_square) / learned - shift ** 2).clamp_min(1e-3).sqrt()
    rest = (standard * scale + shift).reshape(rest.shape)
    return torch.cat([moving, rest], 1)


def read_motion_flow(z: torch.Tensor, frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The coarsest flow ``[B, 2, T', h, w]`` in latent pixels from a measured-motion latent (the inverse of
    the units above: dx units * w / 16, dy units * h / 16). ``frame_size`` (h, w) is the whole latent's
    size when ``z`` is one tile of it."""
    height, width = frame_size or z.shape[3:]
    size = torch.tensor([width, height], dtype=torch.float32, device=z.device).reshape(1, 2, 1, 1, 1)
    return z[:, :MOTION_CHANNELS].float() * size / UNITS_PER_FRAME
