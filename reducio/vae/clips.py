"""Input validation, padding to the latent grid, and splitting long videos into 16-frame clips.

Choices (documented in docs/reducio_vae.md):

* Frame sizes that are not multiples of the spatial factor (32) are padded on the right/bottom by
  **replicating** the last row/column (reflect would fail for frames smaller than the pad and
  mirrors content; zeros create a dark border the model never saw). The decoder output is cropped
  back to the content image's size, so no row or column is lost.
* Videos longer than one clip are cut into consecutive, non-overlapping clips of ``clip_frames``
  (16), each encoded with its own content frame (clip start + 7), as the official latent
  extraction does. A trailing partial clip is completed by repeating its last frame. The latents
  of the clips are **concatenated on the time axis** ([B, C, n_clips * T', h, w]), which is the
  layout a ComfyUI video LATENT carries; decode splits it back into clips of T' latent frames and
  crops the output to ``num_frames`` when given.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

# Values this far outside [-1, 1] are taken as a wrong value range rather than overshoot.
RANGE_TOLERANCE = 0.05


def check_value_range(x: torch.Tensor, what: str) -> None:
    """Raise for input clearly outside [-1, 1]; warn when it looks like [0, 1] data."""
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    if not torch.is_floating_point(x):
        raise TypeError(f"{what} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}; "
                        f"convert uint8 frames with x.float() / 127.5 - 1")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if hi > 1.0 + RANGE_TOLERANCE or lo < -1.0 - RANGE_TOLERANCE:
        hint = ("it looks like 0..255 pixel values: use x / 127.5 - 1" if hi > 2.0
                else "rescale it to [-1, 1]")
        raise ValueError(f"{what} must be in [-1, 1] but spans [{lo:.3g}, {hi:.3g}]; {hint}")
    if lo >= 0.0 and x.numel() > 1024:
        warnings.warn(f"{what} has no negative values; Reducio expects [-1, 1]. If it is in [0, 1] "
                      f"(ComfyUI IMAGE convention), convert it with x * 2 - 1", stacklevel=3)


def validate_video(video: torch.Tensor) -> None:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor [B, 3, T, H, W], got {type(video).__name__}")
    if video.ndim != 5:
        hint = (" (for a single clip add the batch axis: video[None])" if video.ndim == 4 else "")
        raise ValueError(f"video must be 5-D [B, 3, T, H, W], got shape {tuple(video.shape)}{hint}")
    if video.shape[1] != 3:
        hint = (" - it looks like [B, T, C, H, W]; use video.permute(0, 2, 1, 3, 4)"
                if video.shape[2] == 3 else "")
        raise ValueError(f"video must have 3 (RGB) channels on axis 1, got shape {tuple(video.shape)}{hint}")
    check_value_range(video, "video")


def validate_image(image: torch.Tensor, what: str = "content image") -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim not in (4, 5) or image.shape[1] != 3:
        hint = " - it looks channels-last; use x.movedim(-1, 1)" if image.shape[-1] == 3 else ""
        raise ValueError(f"{what} must be [B, 3, H, W] (or [B, 3, n_clips, H, W]), got shape "
                         f"{tuple(image.shape)}{hint}")
    check_value_range(image, what)


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Replicate-pad the last two axes on the right/bottom up to multiples of ``factor``."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % factor, (-width) % factor
    if not (pad_h or pad_w):
        return x
    if x.ndim == 4:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    # 5-D replicate padding pads the last three axes; T gets no padding.
    return F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")


def split_clips(video: torch.Tensor, clip_frames: int) -> list[torch.Tensor]:
    """[B, C, T, H, W] -> list of [B, C, clip_frames, H, W]; the last clip is completed by
    repeating its final frame."""
    frames = video.shape[2]
    clips = []
    for start in range(0, frames, clip_frames):
        clip = video[:, :, start : start + clip_frames]
        missing = clip_frames - clip.shape[2]
        if missing:
            clip = torch.cat([clip, clip[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)
        clips.append(clip)
    return clips


def clip_count(frames: int, clip_frames: int) -> int:
    return max(1, math.ceil(frames / clip_frames))


def content_frames(video: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """The content frame of every clip: [B, 3, n_clips, H, W] (index (clip_frames-1)//2 of each
    clip, after completing a partial last clip)."""
    index = (clip_frames - 1) // 2
    return torch.stack([clip[:, :, index] for clip in split_clips(video, clip_frames)], dim=2)
