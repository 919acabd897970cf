"""Clip conventions shared by the datasets: frame sampling, crops, value range (spec reducio_vae.md §1)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CLIP_FRAMES = 16
CONTENT_INDEX = (CLIP_FRAMES - 1) // 2   # frame 7: the content frame of every Reducio clip
TRAIN_CROP_SCALE = (0.5, 1.0)           # official RandomResizedCrop(scale=(0.5, 1.0))


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the problem and the fix."""


def content_frame(video: torch.Tensor) -> torch.Tensor:
    """Frame 7 of ``[..., 3, 16, H, W]`` -> ``[..., 3, H, W]``."""
    return video[..., CONTENT_INDEX, :, :]


def frame_step(source_fps: float, target_fps: float) -> int:
    """Official rule: every ``round(source_fps / target_fps)``-th frame, at least 1."""
    return max(1, int(round(source_fps / target_fps)))


def clip_indices(total_frames: int, step: int, rng: np.random.Generator, frames: int = CLIP_FRAMES) -> list[int]:
    """``frames`` indices ``start, start + step, ...`` from a random start that keeps them inside the file."""
    span = (frames - 1) * step + 1
    if total_frames < span:
        raise DatasetError(f"needs {span} frames at step {step}, has {total_frames}")
    start = int(rng.integers(0, total_frames - span + 1))
    return [start + k * step for k in range(frames)]


def crop_box(height: int, width: int, size: tuple[int, int], rng: np.random.Generator | None,
             scale: tuple[float, float] = TRAIN_CROP_SCALE) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the source region that is resized to ``size``.

    With ``rng``: a random-resized crop of area ``scale`` x the frame and the output's aspect ratio
    (the official training crop without aspect jitter, so moving content is not stretched); without:
    the largest centred region of the output's aspect (resize the short side, then centre-crop).
    """
    out_h, out_w = size
    aspect = out_w / out_h
    full_h, full_w = (height, min(width, int(round(height * aspect)))) if width / height >= aspect else \
        (min(height, int(round(width / aspect))), width)
    if rng is None:
        return (height - full_h) // 2, (width - full_w) // 2, full_h, full_w
    area = float(rng.uniform(*scale))
    crop_h = max(1, min(full_h, int(round(full_h * math.sqrt(area)))))
    crop_w = max(1, min(full_w, int(round(full_w * math.sqrt(area)))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


def frames_to_clip(frames: torch.Tensor, size: tuple[int, int], rng: np.random.Generator | None) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float32 ``[3, T, h, w]`` in [-1, 1]: one crop for all frames, antialiased resize."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DatasetError(f"frames must be [T, H, W, 3] RGB, got {list(frames.shape)}")
    top, left, crop_h, crop_w = crop_box(frames.shape[1], frames.shape[2], size, rng)
    region = frames[:, top:top + crop_h, left:left + crop_w].permute(0, 3, 1, 2).float() / 255.0
    if (crop_h, crop_w) != tuple(size):
        region = F.interpolate(region, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (region.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3).contiguous()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (clamped), for writing videos and images."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def parse_size(value) -> tuple[int, int]:
    """``64`` / ``"64"`` / ``"64x96"`` (H x W) / ``(64, 96)`` -> (H, W); each a positive multiple of 8."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        size = (int(parts[0]), int(parts[-1]))
    elif isinstance(value, int):
        size = (value, value)
    else:
        size = (int(value[0]), int(value[1]))
    if min(size) < 8 or size[0] % 8 or size[1] % 8:
        raise DatasetError(f"clip size {size[0]}x{size[1]} must be positive multiples of 8 (32 for the Reducio VAE)")
    return size
