"""Constructor configurations: the two official models and validation of user configs.

The values are those of the official ``reducio_kl_ft{4,2}_fs32_z16_attn23.yaml`` (model.params),
without the training-only entries. "ft4" has f_t = 2 (4x temporal compression), "ft2" f_t = 1.
"""
from __future__ import annotations

import copy

_CONTENT_CONFIG = {
    "ch": 128, "z_channels": 4, "out_ch": 3, "resolution": 256, "in_channels": 3,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    "out_z": False, "use_checkpoint": True, "fp32_attention": True,
}


def _video_config(f_t: int) -> dict:
    return {
        "ch": 128, "ch_in": 128, "f_t": f_t, "out_ch": 3, "z_channels": 16, "resolution": 256,
        "in_channels": 3, "temp_res": 16, "ch_mult": [1, 2, 2, 4, 4, 4], "ch_fuse": [-1, -1, 2, 3, -1, -1],
        "fuse_type": "attn", "num_res_blocks": 2, "attn_resolutions": [], "use_3d_conv": True,
        "upsample_first": True, "fuse_mid": True, "use_checkpoint": True, "pos_embed_mode": "t",
        "fp32_attention": True, "window_size": 128,
    }


_OFFICIAL = {
    variant: {
        "embed_dim": 16,
        "ddconfig": _video_config(f_t),
        "ddconfig_2d": _CONTENT_CONFIG,
        "use_tiling": True,
        "tile_overlap_factor": 0.25,
        "tile_sample_min_size": 256,
    }
    for variant, f_t in (("ft4", 2), ("ft2", 1))
}

OFFICIAL_PARAM_COUNTS = {"ft4": 437_095_763, "ft2": 432_379_219}


def official_config(variant: str) -> dict:
    """Constructor kwargs of an official model ('ft4' or 'ft2'); a fresh copy."""
    if variant not in _OFFICIAL:
        raise ValueError(f"unknown Reducio VAE variant {variant!r}; expected one of {sorted(_OFFICIAL)}")
    return copy.deepcopy(_OFFICIAL[variant])


# Official constructor arguments that only matter for training or logging; accepted and ignored.
TRAINING_ONLY_KWARGS = frozenset({
    "lossconfig", "monitor", "image_key", "automatic_optimization", "ignore_keys", "gradient_clip_val",
    "gradient_clip_val_disc", "mask_config", "scheduler_config", "scheduler_disc_config", "freeze_2d",
    "freeze_3d", "base_learning_rate",
})

# ddconfig entries whose only supported value is the official one: key -> allowed values.
_FIXED_VIDEO_OPTIONS = {
    "use_3d_conv": {True}, "upsample_first": {True}, "pos_embed_mode": {"t"},
    "upsample_mode": {"interpolate"}, "norm_type": {"layer"}, "is_tanh_gating": {False},
    "use_conv_shortcut": {False}, "resamp_with_conv": {True}, "double_z": {True}, "enable_fuse": {True},
    "out_z": {True},
}
# ddconfig keys that are inert for inference (training switches, logging, ignored by the code).
_INERT_VIDEO_KEYS = {"resolution", "attn_resolutions", "use_checkpoint", "fp32_attention", "dropout",
                     "init_values", "in_channels"}
_VIDEO_KEYS = {"ch", "ch_in", "f_t", "f_s", "out_ch", "z_channels", "temp_res", "ch_mult", "ch_fuse",
               "fuse_type", "num_res_blocks", "fuse_mid", "fuse_mid_type", "window_size", "tanh_out"}
_CONTENT_KEYS = {"ch", "ch_mult", "num_res_blocks", "out_z", "window_size", "f_s", "fs", "in_channels"}
_INERT_CONTENT_KEYS = {"z_channels", "out_ch", "resolution", "attn_resolutions", "dropout",
                       "use_checkpoint", "fp32_attention", "double_z", "resamp_with_conv", "temp_res",
                       "use_3d_conv"}


def check_ddconfig(ddconfig: dict) -> None:
    """Reject video-branch options this port does not implement, with the reason."""
    unknown = set(ddconfig) - _VIDEO_KEYS - _INERT_VIDEO_KEYS - set(_FIXED_VIDEO_OPTIONS)
    if unknown:
        raise TypeError(f"unknown ddconfig keys {sorted(unknown)}")
    for key, allowed in _FIXED_VIDEO_OPTIONS.items():
        if key in ddconfig and ddconfig[key] not in allowed:
            raise NotImplementedError(
                f"ddconfig.{key}={ddconfig[key]!r} is not used by the official Reducio models and is not "
                f"implemented (supported: {sorted(map(str, allowed))})")
    fuse_type = ddconfig.get("fuse_type")
    types = fuse_type if isinstance(fuse_type, (list, tuple)) else [fuse_type] * len(ddconfig["ch_mult"])
    for level, (kind, index) in enumerate(zip(types, ddconfig.get("ch_fuse", []))):
        if index >= 0 and kind != "attn":
            raise NotImplementedError(f"fusion type {kind!r} at decoder level {level} is not implemented; "
                                      f"only 'attn' (cross-attention) is used by the official models")


def check_content_config(ddconfig_2d: dict) -> None:
    unknown = set(ddconfig_2d) - _CONTENT_KEYS - _INERT_CONTENT_KEYS
    if unknown:
        raise TypeError(f"unknown ddconfig_2d keys {sorted(unknown)}")
    if ddconfig_2d.get("out_z", False):
        raise NotImplementedError("ddconfig_2d.out_z=True (latent content branch) is not implemented; "
                                  "the official models use the content feature pyramid (out_z False)")
