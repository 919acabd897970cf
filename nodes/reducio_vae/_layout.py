"""Tensor layouts between ComfyUI sockets and the Reducio VAE (pure torch, no ComfyUI import).

ComfyUI carries a video as an IMAGE batch of frames ``[N, H, W, 3]`` in 0..1; the ``reducio``
package works on videos ``[B, 3, T, H, W]`` in -1..1 made of 16-frame clips.

Layout decisions (documented in docs/reducio_vae_nodes.md):

* A video of ``N = k * 16`` frames is ``k`` consecutive, non-overlapping clips. Each clip is encoded
  on its own with its own content frame (clip start + 7, the official middle frame).
* The motion latent of a video is ``[1, C, k * t, h, w]``: the clips' latents concatenated along
  time (``t`` latent frames per clip: 4 for "ft4", 8 for "ft2"). A LATENT with batch ``B`` holds
  ``B * k`` clips, batch-major. Everything decoding needs (number of clips, latent size) is in the
  tensor's shape, so it survives SaveLatent/LoadLatent, which keep only ``samples``.
* The content IMAGE holds one frame per clip in the same order; a single content frame may stand for
  every clip (e.g. one image conditioning a batch of generated clips).
* Sides that are not multiples of 32 are padded by the ``reducio`` package (edge replication) and
  the decoded frames are cropped back to the content frame's size, so the output has the input's
  size: ``h = ceil(H / 32)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VALUE_TOLERANCE = 1e-3    # IMAGE values this little outside 0..1 (resampling overshoot) are clamped

FRAMES_ERROR = "error"
FRAMES_PAD = "pad_repeat_last"
FRAMES_TRIM = "trim"
FRAME_HANDLING = (FRAMES_ERROR, FRAMES_PAD, FRAMES_TRIM)


class ReducioInputError(ValueError):
    """Input that the Reducio VAE nodes cannot use; the message names the problem and the fix."""


@dataclass(frozen=True)
class LatentGeometry:
    """What a loaded Reducio VAE expects of its inputs and latents."""
    channels: int = 16          # latent channels (16 for the official models)
    frames_per_clip: int = 4    # latent frames per clip: 4 ("ft4") or 8 ("ft2")
    spatial_factor: int = 32    # pixels per latent position along H and W
    clip_frames: int = 16       # video frames per clip

    @property
    def content_index(self) -> int:
        """The official content frame of a clip: its middle frame, index 7."""
        return (self.clip_frames - 1) // 2


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def check_image(images: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a ComfyUI IMAGE batch and return it as float32, clamped to 0..1."""
    images = validate_image(images, what)
    images = images.float()
    return images.clamp(0.0, 1.0) if (images.min() < 0.0 or images.max() > 1.0) else images


def validate_image(images: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a ComfyUI IMAGE batch without copying it: the same tensor (a single frame gets a
    batch axis), still in its own dtype and with overshoot up to VALUE_TOLERANCE not yet clamped
    (the encode path converts one clip at a time, see clip_video)."""
    if not isinstance(images, torch.Tensor):
        raise ReducioInputError(f"{what}: expected an IMAGE tensor, got {type(images).__name__}.")
    if images.ndim == 3:
        images = images.unsqueeze(0)   # a single [H, W, C] frame
    if images.ndim != 4:
        raise ReducioInputError(
            f"{what}: expected an IMAGE batch [frames, height, width, 3], got shape {list(images.shape)}.")
    channels = images.shape[-1]
    if channels != 3:
        fix = ("drop the alpha channel (Load Image already outputs RGB plus a separate MASK)" if channels == 4
               else "convert it to RGB (for a mask use 'Convert Mask to Image')")
        raise ReducioInputError(f"{what}: Reducio needs RGB frames with 3 channels, got {channels}; {fix}.")
    if min(images.shape[:3]) < 1:
        raise ReducioInputError(f"{what}: empty IMAGE of shape {list(images.shape)}.")
    if not torch.is_floating_point(images):
        raise ReducioInputError(f"{what}: expected a floating-point IMAGE in 0..1, got dtype {images.dtype}.")
    low, high = float(images.min()), float(images.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ReducioInputError(f"{what}: the frames contain NaN or infinite values.")
    if low < -VALUE_TOLERANCE or high > 1.0 + VALUE_TOLERANCE:
        hint = (" They look like 0..255 pixel values: divide by 255." if high > 2.0
                else " If they are in -1..1, map them with (x + 1) / 2.")
        raise ReducioInputError(
            f"{what}: IMAGE values must lie in 0..1 (ComfyUI's convention), got {low:.3g}..{high:.3g}.{hint}")
    return images


def clip_ranges(count: int, handling: str, clip_frames: int = 16) -> list[tuple[int, int]]:
    """The ``(start, stop)`` frame range of every clip, as ``handling`` says for a frame count that
    is not a multiple of ``clip_frames``: a short last range ('pad_repeat_last': clip_video
    completes it by repeating its last frame), the full clips only ('trim'), or an error.

    Ranges, not tensors: the video is only ever read one clip at a time, never copied whole.
    """
    if handling not in FRAME_HANDLING:
        raise ReducioInputError(f"frame_handling must be one of {list(FRAME_HANDLING)}, got {handling!r}.")
    remainder = count % clip_frames
    if remainder == 0 or handling == FRAMES_PAD or (handling == FRAMES_TRIM and count >= clip_frames):
        end = count - remainder if handling == FRAMES_TRIM else count
        return [(start, min(start + clip_frames, end)) for start in range(0, end, clip_frames)]
    padded = count + clip_frames - remainder
    fix = (f"set frame_handling to '{FRAMES_PAD}' (repeats the last frame up to {padded} frames; the decoded "
           f"video then ends with those copies)")
    if count >= clip_frames:
        fix += f", or to '{FRAMES_TRIM}' (drops the last {remainder} frames)"
    else:
        fix += f" ('{FRAMES_TRIM}' needs at least {clip_frames} frames)"
    raise ReducioInputError(
        f"got {count} frames, but Reducio encodes clips of exactly {clip_frames} frames (1 s at 16 fps), so the "
        f"frame count must be a multiple of {clip_frames}. Fix: {fix}; or select the frames yourself with the "
        "core ImageFromBatch node (batch_index, length).")


def clip_video(frames: torch.Tensor, span: tuple[int, int], clip_frames: int = 16) -> torch.Tensor:
    """One clip of a validated IMAGE [N, H, W, 3] in 0..1 -> video [1, 3, clip_frames, H, W] in -1..1
    (float32, clamped), a short range completed by repeating its last frame.

    The only copy made is of this one clip (a whole video at full resolution is gigabytes).
    """
    start, stop = span
    frames = frames[start:stop]
    missing = clip_frames - frames.shape[0]
    if missing:
        frames = torch.cat([frames, frames[-1:].expand(missing, *frames.shape[1:])], dim=0)
    video = frames.permute(3, 0, 1, 2).unsqueeze(0).float() * 2.0   # new float32 tensor
    return video.sub_(1.0).clamp_(-1.0, 1.0)


def content_frames_of(frames: torch.Tensor, spans: list[tuple[int, int]], geometry: LatentGeometry) -> torch.Tensor:
    """The content frame of each clip (clip start + 7, or the repeated last frame of a short
    last clip), as IMAGE [k, H, W, 3] float32 in 0..1."""
    index = [min(start + geometry.content_index, stop - 1) for start, stop in spans]
    return frames[index].float().clamp_(0.0, 1.0)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded videos [B, 3, T, H, W] in about -1..1 -> IMAGE [B*T, H, W, 3] in 0..1."""
    frames = video.float().permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3)   # one copy
    return frames.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)


def check_latent(samples, geometry: LatentGeometry) -> torch.Tensor:
    """Validate a motion latent [B, C, k*t, h, w]; errors say where a wrong latent came from."""
    if not isinstance(samples, torch.Tensor):
        raise ReducioInputError(f"the LATENT's 'samples' is not a tensor ({type(samples).__name__}).")
    shape = list(samples.shape)
    factor = geometry.spatial_factor
    expected = f"[batch, {geometry.channels}, clips x {geometry.frames_per_clip}, height/{factor}, width/{factor}]"
    if samples.ndim != 5:
        hint = (" This looks like an image latent (e.g. from Empty Latent Image or VAE Encode); Reducio VAE "
                "Decode takes motion latents from Reducio VAE Encode, Load Latent of such a file, or Reducio-DiT."
                if samples.ndim == 4 else "")
        raise ReducioInputError(f"expected a 5-D Reducio motion latent {expected}, got shape {shape}.{hint}")
    if shape[1] != geometry.channels:
        raise ReducioInputError(
            f"this Reducio VAE uses {geometry.channels}-channel latents, but the LATENT has {shape[1]} channels "
            f"(shape {shape}), so it was not made by this VAE (another video model's latent, e.g. Wan's, has a "
            "different layout). Encode the video with Reducio VAE Encode and the same VAE.")
    if shape[2] == 0 or shape[2] % geometry.frames_per_clip != 0:
        raise ReducioInputError(
            f"this Reducio VAE makes {geometry.frames_per_clip} latent frames per 16-frame clip, but the LATENT "
            f"has {shape[2]} (shape {shape}). It was made by another video model or by the other Reducio variant "
            "(ft4 makes 4 per clip, ft2 makes 8): use the VAE that made it.")
    if min(shape[3:]) < 1:
        raise ReducioInputError(f"the LATENT is empty (shape {shape}).")
    if not torch.isfinite(samples).all():
        raise ReducioInputError("the LATENT contains NaN or infinite values.")
    return samples.float()


def content_for_latent(content: torch.Tensor, latent_shape, geometry: LatentGeometry) -> torch.Tensor:
    """Content IMAGE [n, H, W, 3] -> [B, 3, k, H, W] in -1..1, one frame per clip of the latent."""
    batch, _, frames, lat_h, lat_w = latent_shape
    clips_per_item = frames // geometry.frames_per_clip
    n_clips = batch * clips_per_item
    count, height, width, _ = content.shape
    factor = geometry.spatial_factor
    if _ceil_div(height, factor) != lat_h or _ceil_div(width, factor) != lat_w:
        raise ReducioInputError(
            f"the content image is {width}x{height} px (width x height), but the latent is {lat_w}x{lat_h} "
            f"positions, which decodes frames of width {(lat_w - 1) * factor + 1}..{lat_w * factor} and height "
            f"{(lat_h - 1) * factor + 1}..{lat_h * factor} px. Use the content frame(s) that Reducio VAE Encode "
            "output with this latent (or the image a generated latent was conditioned on), at that size.")
    if count == 1 and n_clips > 1:
        content = content.expand(n_clips, -1, -1, -1)
    elif count != n_clips:
        raise ReducioInputError(
            f"the latent holds {n_clips} clip(s) ({batch} x {clips_per_item}) but {count} content frames were "
            "given: give one content frame per 16-frame clip in the same order (Reducio VAE Encode's "
            "content_frames output), or a single frame for every clip.")
    content = content.reshape(batch, clips_per_item, height, width, 3).permute(0, 4, 1, 2, 3)
    return (content * 2.0 - 1.0).contiguous()
