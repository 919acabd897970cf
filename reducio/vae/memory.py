"""Memory estimate for encode/decode, used by the nodes to pick tile and batch sizes.

The estimate is analytic: weights + (peak activation factor x the largest activation tensor of the
network at the processed size) + attention score chunks + the input/output/tile buffers of the
call. The factors were calibrated on the full ft4 model in float32 on CPU (bench/reducio_vae_results.md):
our 16x256x256 encode peaks at +2.6 GiB over the weights (largest tensor 0.5 GiB: 5.2x) and the
16x128x128 decode at +1.0 GiB (largest tensor 0.25 GiB: 4.0x; the official 256x256 decode needs up
to +4.2 GiB with a 1 GiB largest tensor); we use 5.5x for encode and 4.5x for decode. In half precision the
norms run in float32 and add an fp32 input copy and output for the largest tensor. The Python/torch
process itself (~0.4 GiB on CPU, the CUDA context on GPU) is not included.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .blocks import MAX_ATTENTION_SCORE_ELEMENTS
from .config import fusion_parts, level_fuse_types
from .decoder import decoder_level_frames, decoder_upsample_kind
from .encoder import encoder_downsample_kind
from .motion import has_object_channels
from .tiling import TileLayout

PEAK_ACTIVATION_FACTOR = {"encode": 5.5, "decode": 4.5}
FP32_NORM_BYTES_PER_ELEMENT = 8  # fp32 copy of the input + fp32 output when running in half precision


def _config_of(config_or_model) -> dict:
    return config_or_model.config if hasattr(config_or_model, "config") else config_or_model


def parameter_count(config_or_model) -> int:
    """Number of parameters (built on the meta device when only a config is given)."""
    if isinstance(config_or_model, torch.nn.Module):
        return sum(p.numel() for p in config_or_model.parameters())
    from .model import ReducioVAE

    with torch.device("meta"):
        model = ReducioVAE(**config_or_model)
    return sum(p.numel() for p in model.parameters())


def _encoder_peak_elements(dd: dict, frames: int, height: int, width: int) -> tuple[int, int]:
    """(largest activation, largest attention score matrix) of encoder_3d for one sample."""
    n = len(dd["ch_mult"])
    f_s, f_t = dd.get("f_s", n - 1), dd.get("f_t", 0)
    ch = dd["ch"]
    largest = 0
    t, h, w = frames, height, width
    for level in range(n):
        width_in = ch * ((1,) + tuple(dd["ch_mult"]))[level]
        width_out = ch * dd["ch_mult"][level]
        largest = max(largest, max(width_in, width_out) * t * h * w)
        kind = encoder_downsample_kind(level, n, f_s, f_t)
        if kind in ("spatial", "full"):
            h, w = h // 2, w // 2
        if kind in ("temporal", "full"):
            t = t // 2
    tokens = t * h * w
    return largest, 8 * tokens * tokens


def _content_peak_elements(dd2: dict, height: int, width: int) -> int:
    ch, mult = dd2["ch"], dd2["ch_mult"]
    largest, h, w = 0, height, width
    for level in range(len(mult)):
        largest = max(largest, ch * max(((1,) + tuple(mult))[level], mult[level]) * h * w)
        if level < len(mult) - 1:
            h, w = h // 2, w // 2
    return largest


def _decoder_peak_elements(dd: dict, dd2: dict, height: int, width: int) -> tuple[int, int]:
    """(largest activation, largest cross/self-attention score matrix) of the decoder, one sample."""
    n = len(dd["ch_mult"])
    f_s, f_t, temp_res = dd.get("f_s", n - 1), dd.get("f_t", 0), dd["temp_res"]
    ch_in = dd.get("ch_in") or dd["ch"]
    largest, scores = 0, 0
    kinds = level_fuse_types(dd.get("fuse_type", "attn"), n)
    latent_h, latent_w = height // 2 ** f_s, width // 2 ** f_s
    latent_t = temp_res // 2 ** f_t
    latent_tokens = latent_t * latent_h * latent_w
    scores = 8 * latent_tokens * latent_tokens
    prev_width = ch_in * dd["ch_mult"][-1]
    for level in reversed(range(n)):
        frames = decoder_level_frames(level, n, temp_res, f_t)
        h, w = height // 2 ** level, width // 2 ** level
        width_l = ch_in * dd["ch_mult"][level]
        largest = max(largest, max(prev_width, width_l) * frames * h * w)
        fuse = dd["ch_fuse"][level]
        if fuse >= 0 and "warp" in fusion_parts(kinds[level]):   # the content features moved, once per frame
            largest = max(largest, dd2["ch"] * dd2["ch_mult"][fuse] * frames * h * w)
        if fuse >= 0 and "attn" in fusion_parts(kinds[level]):   # add / warp: convolutions, no score matrix
            ctx = (height // 2 ** fuse) * (width // 2 ** fuse)
            scores = max(scores, max(1, width_l // 64) * frames * h * w * ctx)
        kind = decoder_upsample_kind(level, n, f_s, f_t)
        if kind is not None:
            up_frames = frames * (2 if kind in ("temporal", "full") else 1)
            largest = max(largest, width_l * up_frames * (2 * h) * (2 * w))  # up-sampled map
        prev_width = width_l
    return largest, scores


def available_memory(device) -> int:
    """Bytes free for activations on ``device`` now: CUDA's free memory, or the system's available RAM
    (MemAvailable) on the CPU. Unknown: assume 16 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def plan_tiling(config_or_model, op: str, frames: int, height: int, width: int, batch: int = 1,
                dtype: torch.dtype = torch.float32, tiling: Optional[bool] = None, tile_size: Optional[int] = None,
                budget_bytes: Optional[int] = None, device="cpu") -> tuple[bool, Optional[int]]:
    """(tile?, tile size or None for the model's own) of an encode/decode call; the one tiling rule.

    ``tiling`` True/False forces it. ``tiling=None`` follows the config's ``use_tiling``:
    * True (the official 1024-px configs): tile when the padded frame exceeds one tile window (the
      tiled path is the identity for frames inside one window);
    * False (the official 256-px configs): never tile, as the official code;
    * "auto" (a config detected from the weights, which cannot say which official config was meant):
      untiled when the memory estimate of the untiled run fits ``budget_bytes`` (default: the memory
      available on ``device`` now), else the largest tiles that fit, else the smallest tiles.
    """
    if tiling is not None:
        return bool(tiling), tile_size
    config = _config_of(config_or_model)
    policy = config.get("use_tiling", False)
    dd = config["ddconfig"]
    factor = 2 ** dd.get("f_s", len(dd["ch_mult"]) - 1)
    padded_h, padded_w = math.ceil(height / factor) * factor, math.ceil(width / factor) * factor
    if policy is True:
        layout = TileLayout(tile=tile_size or config.get("tile_sample_min_size", 256),
                            overlap=config.get("tile_overlap_factor", 0.25), spatial_factor=factor)
        return layout.needs_tiling(padded_h, padded_w), tile_size
    if policy != "auto":
        return False, tile_size
    budget = available_memory(device) if budget_bytes is None else budget_bytes
    untiled = estimate_memory(config_or_model, op, frames, height, width, batch, dtype, tiling=False)
    if untiled <= budget:
        return False, tile_size
    if tile_size is not None:
        return True, tile_size
    try:
        chosen = choose_tile_size(config_or_model, op, frames, height, width, budget, batch, dtype,
                                  min_tile=4 * factor)
    except ValueError:
        chosen = 4 * factor  # nothing is predicted to fit: the smallest tiles are the best chance
    return True, chosen


def _activation_bytes(op: str, elements: int, scores: int, itemsize: int) -> int:
    per_element = PEAK_ACTIVATION_FACTOR[op] * itemsize + (FP32_NORM_BYTES_PER_ELEMENT if itemsize < 4 else 0)
    return int(elements * per_element) + min(scores, MAX_ATTENTION_SCORE_ELEMENTS) * itemsize


def estimate_memory(config_or_model, op: str, frames: int = 16, height: int = 256, width: int = 256,
                    batch: int = 1, dtype: torch.dtype = torch.float32, tiling: Optional[bool] = None,
                    tile_size: Optional[int] = None, include_weights: bool = True) -> int:
    """Bytes needed by ``ReducioVAE.encode`` / ``decode`` for a video of ``frames`` x ``height`` x ``width``.

    ``op``: "encode" or "decode". ``tiling``/``tile_size`` as in the encode/decode calls
    (None = what the config's ``use_tiling`` chooses, see :func:`plan_tiling`; for "auto" with the
    memory available on the CPU now). Clips are processed one after the other, so ``frames`` only adds
    input/output buffers; ``batch`` multiplies the activations.
    """
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode', got {op!r}")
    config = _config_of(config_or_model)
    dd, dd2 = config["ddconfig"], config["ddconfig_2d"]
    n = len(dd["ch_mult"])
    factor = 2 ** dd.get("f_s", n - 1)
    clip = dd["temp_res"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    padded_h, padded_w = math.ceil(height / factor) * factor, math.ceil(width / factor) * factor
    layout = TileLayout(tile=tile_size or config.get("tile_sample_min_size", 256),
                        overlap=config.get("tile_overlap_factor", 0.25), spatial_factor=factor)
    if tiling is None:
        tiling, tile_size = plan_tiling(config_or_model, op, frames, height, width, batch, dtype, None, tile_size)
        layout = TileLayout(tile=tile_size or config.get("tile_sample_min_size", 256),
                            overlap=config.get("tile_overlap_factor", 0.25), spatial_factor=factor)
    use_tiling = tiling
    tile_h = min(padded_h, layout.pixel_window) if use_tiling else padded_h
    tile_w = min(padded_w, layout.pixel_window) if use_tiling else padded_w

    n_clips = max(1, math.ceil(frames / clip))
    video_elements = 3 * n_clips * clip * padded_h * padded_w
    if op == "encode":
        largest, scores = _encoder_peak_elements(dd, clip, tile_h, tile_w)
        # caller's input (float32) + padded copy + clip copy in the model dtype
        buffers = video_elements * 4 + 2 * 3 * clip * padded_h * padded_w * itemsize
    else:
        largest, scores = _decoder_peak_elements(dd, dd2, tile_h, tile_w)
        largest = max(largest, _content_peak_elements(dd2, tile_h, tile_w))
        rows, cols = layout.grid_shape(padded_h, padded_w) if use_tiling else (1, 1)
        tile_out = 3 * clip * tile_h * tile_w * itemsize
        # output video (float32) + per-clip output + two rows of decoded tiles being blended
        buffers = video_elements * 4 + 3 * clip * padded_h * padded_w * 4 + 2 * cols * tile_out
        if use_tiling:  # blended content features kept for every tile (decoder levels only)
            kept = sum(dd2["ch"] * dd2["ch_mult"][i] * (tile_h // 2 ** (i % len(dd2["ch_mult"])))
                       * (tile_w // 2 ** (i % len(dd2["ch_mult"])))
                       for i in {k % len(dd2["ch_mult"]) for k in dd["ch_fuse"] if k >= 0} | {len(dd2["ch_mult"]) - 1})
            buffers += rows * cols * kept * itemsize
        if dd.get("composite_output", False):
            # FusionDecoder._composite (float32): per output element the content frame in each tile, the
            # moved pictures (the camera's and, with object channels, the objects', plus the one being
            # made) and their distances, the mix's input ((last width + 2) channels) and the weights
            buffers += rows * cols * 3 * tile_h * tile_w * 4
            width = (dd.get("ch_in") or dd["ch"]) * dd["ch_mult"][0]
            pictures = 1 + has_object_channels(dd.get("latent_motion", "learned"))
            buffers += clip * tile_h * tile_w * ((3 * (pictures + 1) + pictures + pictures + 1) * 4
                                                 + (width + 2) * itemsize)
    total = batch * (_activation_bytes(op, largest, scores, itemsize) + buffers)
    if include_weights:
        total += parameter_count(config_or_model) * itemsize
    return int(total)


def choose_tile_size(config_or_model, op: str, frames: int, height: int, width: int, budget_bytes: int,
                     batch: int = 1, dtype: torch.dtype = torch.float32,
                     min_tile: int = 128) -> Optional[int]:
    """Largest tile size whose estimate fits ``budget_bytes``; None when no tiling is needed.

    Returns None if the untiled run fits and the frame is not larger than the default tile window.
    Raises ValueError when even ``min_tile`` does not fit.
    """
    config = _config_of(config_or_model)
    common = dict(frames=frames, height=height, width=width, batch=batch, dtype=dtype)
    weights = parameter_count(config_or_model) * torch.empty((), dtype=dtype).element_size()
    if estimate_memory(config, op, tiling=False, **common, include_weights=False) + weights <= budget_bytes:
        return None
    step = 128
    start = max(min_tile, math.ceil(max(height, width) / step) * step)
    for tile in range(start, min_tile - 1, -step):
        if tile < min_tile:
            break
        if estimate_memory(config, op, tiling=True, tile_size=tile, include_weights=False, **common) + weights <= budget_bytes:
            return tile
    need = estimate_memory(config, op, tiling=True, tile_size=min_tile, include_weights=False, **common) + weights
    raise ValueError(f"Reducio VAE {op} of {frames}x{height}x{width} needs about {need / 2**30:.1f} GiB even with "
                     f"{min_tile}-px tiles, more than the {budget_bytes / 2**30:.1f} GiB available; lower the batch "
                     f"size, use a half-precision dtype or free memory")
