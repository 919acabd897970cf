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

Object motion (``latent_motion: "measured+objects"``, ours): channels 2-3 hold, per latent cell and
latent frame, the shift of *what moves against the camera* there (a sprite, a person), measured by
:func:`object_shifts`; zero where everything in the cell moves with the camera. Why: with the camera
alone in the latent the decoder leaves every sprite where the content frame has it; measured on 32
held-out clips at 64 px, the content frame moved by the exact camera motion reaches 21.6 dB, with the
sprites pasted at their true places 24.6 dB, and with the hole a sprite leaves filled from its
surroundings 35.4 dB (``bench/eval_reducio_vae.py``'s ceilings): most of the error left is the sprites.
A sprite is smaller than a latent cell (32 px), so the cell's own dominant motion is the camera's; the
object shift is a second motion per cell, and the decoder learns which pixels follow it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import phase_shifts
from .blocks import warp_frames

MOTION_CHANNELS = 2
UNITS_PER_FRAME = 16     # one unit = 1/16 of the frame side
MAX_UNITS = 2.4          # 15 % of the frame
# object motion (channels 2-3): one unit = 1/8 of the frame side, at most 17.5 % of the frame, so that
# all four motion channels at their largest still hold less than the latent's unit variance at 16
# channels: (2 * 2.4^2 + 2 * 1.4^2) / 16 = 0.97
OBJECT_CHANNELS = 2
OBJECT_UNITS_PER_FRAME = 8
MAX_OBJECT_UNITS = 1.4
# object_shifts works at this many pixels per latent cell (16: 2-pixel steps at 64 px, 32 px per cell)
OBJECT_CELL_PIXELS = 16
# a pixel has changed when its mean |colour difference| ([-1, 1] values) from the camera-moved content
# frame exceeds this (bilinear resampling and sensor noise stay below it)
OBJECT_CHANGE = 0.1
# a cell's object shift is kept only when it leaves at most this share of the cell's change unexplained,
# and only in cells whose change (the sum of the excess over OBJECT_CHANGE, in working pixels of a
# 16 x 16 cell) reaches OBJECT_MIN_CHANGE. Measured on 120 training clips (pans and still views): the
# resampling of textured photographs under a pan makes cells of at most 0.62 pass the share test
# without any object; a sprite's cells are at 9 (median), 3.4 (quartile)
OBJECT_ACCEPT = 0.6
OBJECT_MIN_CHANGE = 1.0


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


def measure_latent_motion(video: torch.Tensor, content_index: int, latent_frames: int,
                          camera: torch.Tensor | None = None) -> torch.Tensor:
    """The motion channels' values for one clip ``[B, 3, T, H, W]``: ``[B, 2, latent_frames]`` in units,
    the mean of :func:`frame_shifts` over the frames each latent frame covers (``camera``: those shifts
    when the caller has them already)."""
    batch, _, frames, height, width = video.shape
    shifts = (frame_shifts(video, content_index) if camera is None else camera).float()
    grouped = shifts.reshape(batch, 2, latent_frames, frames // latent_frames).mean(-1)
    size = torch.tensor([width, height], dtype=grouped.dtype, device=grouped.device).reshape(1, 2, 1)
    return (grouped * UNITS_PER_FRAME / size).clamp(-MAX_UNITS, MAX_UNITS)


def object_shifts(video: torch.Tensor, camera: torch.Tensor, content_index: int,
                  cells: tuple[int, int]) -> torch.Tensor:
    """Per frame and latent cell, the shift of what moves against the camera: ``[B, 2, T, h, w]`` (dx, dy)
    as fractions of the frame's width / height, a backward flow on top of the camera's: frame t at (x, y)
    in that cell is near the content frame at (x, y) + camera + shift. Zero where nothing does.

    ``camera`` [B, 2, T] is :func:`frame_shifts` (pixels). Method: at ``OBJECT_CELL_PIXELS`` per cell,
    the content frame moved by the camera predicts each frame; the pixels it gets wrong by more than
    ``OBJECT_CHANGE`` are the changed ones (an object where it is now, and the hole where it was), except
    where the camera brings in what the content frame never showed. Every
    integer shift up to ``MAX_OBJECT_UNITS`` is tried on top of the camera's, and per cell the one that
    best explains the changed pixels (their change-weighted |difference|) wins if it leaves at most
    ``OBJECT_ACCEPT`` of the cell's change unexplained and the cell changed enough to hold an object
    (``OBJECT_MIN_CHANGE``). Wrong guesses cost little: the decoder learns
    which pixels follow the shift (the object's colours), and a shift that explains nothing is refused.
    """
    batch, _, frames, height, width = video.shape
    rows, cols = cells
    work_h, work_w = min(height, rows * OBJECT_CELL_PIXELS), min(width, cols * OBJECT_CELL_PIXELS)
    clip = video.float().transpose(1, 2).reshape(batch * frames, -1, height, width)
    if (work_h, work_w) != (height, width):
        clip = F.interpolate(clip, size=(work_h, work_w), mode="area")
    clip = clip.reshape(batch, frames, -1, work_h, work_w)
    scale = torch.tensor([work_w / width, work_h / height], device=video.device).reshape(1, 2, 1, 1, 1)
    flow = (camera.float()[:, :, :, None, None] * scale).expand(-1, -1, -1, work_h, work_w)
    predicted = warp_frames(clip[:, content_index], flow).transpose(1, 2)              # [B, T, 3, h, w]
    weight = ((clip - predicted).abs().mean(2) - OBJECT_CHANGE).clamp_min(0)            # [B, T, h, w]
    # what the camera brings in at the frame's edges was never in the content frame: not an object
    xs = torch.arange(work_w, device=video.device).reshape(1, 1, 1, work_w) + 0.5 + flow[:, 0, :, :1, :]
    ys = torch.arange(work_h, device=video.device).reshape(1, 1, work_h, 1) + 0.5 + flow[:, 1, :, :, :1]
    weight = weight * ((xs >= 0) & (xs <= work_w) & (ys >= 0) & (ys <= work_h))

    def cell_cost(candidate: torch.Tensor) -> torch.Tensor:
        error = (clip - candidate).abs().mean(2) * weight
        return F.adaptive_avg_pool2d(error.reshape(batch * frames, 1, work_h, work_w), (rows, cols))

    unexplained = cell_cost(predicted)
    change = F.adaptive_avg_pool2d(weight.reshape(batch * frames, 1, work_h, work_w), (rows, cols))
    change = change * (work_h / rows) * (work_w / cols)                                 # sum per cell
    best, best_shift = unexplained.clone(), torch.zeros(batch * frames, 2, rows, cols, device=video.device)
    reach_y = int(MAX_OBJECT_UNITS / OBJECT_UNITS_PER_FRAME * work_h)
    reach_x = int(MAX_OBJECT_UNITS / OBJECT_UNITS_PER_FRAME * work_w)
    padded = F.pad(predicted.reshape(batch * frames, -1, work_h, work_w), (reach_x, reach_x, reach_y, reach_y),
                   mode="replicate").reshape(batch, frames, -1, work_h + 2 * reach_y, work_w + 2 * reach_x)
    for dy in range(-reach_y, reach_y + 1):
        for dx in range(-reach_x, reach_x + 1):
            if dx == 0 and dy == 0:
                continue
            # predicted at (x + dx, y + dy): the content frame at (x, y) + camera + (dx, dy)
            cost = cell_cost(padded[..., reach_y + dy:reach_y + dy + work_h, reach_x + dx:reach_x + dx + work_w])
            better = cost < best
            best = torch.where(better, cost, best)
            shift = torch.tensor([dx / work_w, dy / work_h], device=video.device).reshape(1, 2, 1, 1)
            best_shift = torch.where(better, shift, best_shift)
    kept = (best <= OBJECT_ACCEPT * unexplained) & (change >= OBJECT_MIN_CHANGE * work_h * work_w
                                                       / (rows * cols * OBJECT_CELL_PIXELS ** 2))
    shifts = torch.where(kept, best_shift, torch.zeros_like(best_shift))
    shifts = shifts.reshape(batch, frames, 2, rows, cols).transpose(1, 2).clone()
    shifts[:, :, content_index] = 0.0
    return shifts


def measure_object_motion(video: torch.Tensor, content_index: int, latent_frames: int, cells: tuple[int, int],
                          camera: torch.Tensor | None = None) -> torch.Tensor:
    """The object channels' values ``[B, 2, latent_frames, h, w]`` in units (1/8 of the frame): the mean
    of :func:`object_shifts` over the frames each latent frame covers. ``camera``: :func:`frame_shifts`
    when the caller has it already."""
    batch, _, frames = video.shape[:3]
    if camera is None:
        camera = frame_shifts(video, content_index)
    shifts = object_shifts(video, camera, content_index, cells)
    grouped = shifts.reshape(batch, 2, latent_frames, frames // latent_frames, *cells).mean(3)
    return (grouped * OBJECT_UNITS_PER_FRAME).clamp(-MAX_OBJECT_UNITS, MAX_OBJECT_UNITS)


def measure_motion(video: torch.Tensor, content_index: int, latent_shape: tuple[int, int, int],
                   kind: str) -> torch.Tensor:
    """All measured channels of ``ddconfig.latent_motion`` = ``kind`` for one clip: ``[B, M, T', h, w]``."""
    latent_frames, rows, cols = latent_shape
    camera = frame_shifts(video, content_index).float()
    units = measure_latent_motion(video, content_index, latent_frames, camera)
    channels = [units[:, :, :, None, None].expand(-1, -1, -1, rows, cols)]
    if kind == "measured+objects":
        channels.append(measure_object_motion(video, content_index, latent_frames, (rows, cols), camera))
    return torch.cat(channels, 1)


def embed_motion(z: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """``z`` [B, C, T', h, w] with its leading channels set to ``motion`` -- [B, M, T', h, w], or [B, 2, T']
    spread over h, w -- and the other channels standardised and scaled so the whole latent has zero
    mean and unit variance (see the module docstring); float32."""
    z = z.float()
    batch, channels = z.shape[:2]
    if motion.ndim == 3:
        motion = motion[:, :, :, None, None]
    moving = motion.float().expand(-1, -1, -1, *z.shape[3:])
    rest = z[:, moving.shape[1]:]
    flat = rest.reshape(batch, -1)
    total, learned = z[0].numel(), flat.shape[1]
    standard = (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True).clamp_min(1e-8)
    motion_sum = moving.reshape(batch, -1).sum(1, keepdim=True)
    motion_square = moving.reshape(batch, -1).pow(2).sum(1, keepdim=True)
    shift = -motion_sum / learned
    # MAX_UNITS and MAX_OBJECT_UNITS keep the motion's share of the variance below 1 (C >= 16, config.py)
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


def read_object_flow(z: torch.Tensor, frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The object flow ``[B, 2, T', h, w]`` in latent pixels, per cell, from channels 2-3 of a
    ``measured+objects`` latent (units of 1/8 of the frame; ``frame_size`` as in :func:`read_motion_flow`)."""
    height, width = frame_size or z.shape[3:]
    size = torch.tensor([width, height], dtype=torch.float32, device=z.device).reshape(1, 2, 1, 1, 1)
    objects = z[:, MOTION_CHANNELS:MOTION_CHANNELS + OBJECT_CHANNELS].float()
    return objects * size / OBJECT_UNITS_PER_FRAME
