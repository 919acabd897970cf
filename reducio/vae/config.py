"""Constructor configurations: the two official models and validation of user configs.

The values are those of the official ``reducio_kl_ft{4,2}_fs32_z16_attn23.yaml`` (model.params),
without the training-only entries. "ft4" has f_t = 2 (4x temporal compression), "ft2" f_t = 1.
"""
from __future__ import annotations

import copy

from ..validation import (ConfigError, check_bool, check_choice, check_int, check_int_list, check_known_fields,
                          check_mapping, check_number)

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
                     "init_values"}
# fusion kinds per decoder level: those of the official FusionDecoder ('linear' exists there too but no
# model uses it) and ours, 'warp' (an 'add' fusion whose content features are moved by a predicted flow,
# blocks.WarpFusion) after attention or alone. A kind names its blocks in order, joined by '+'.
FUSE_TYPES = ("attn", "add", "add+attn", "warp", "attn+warp")
# the parts that add content features of the same resolution (they need ch_fuse[level] == level)
SAME_LEVEL_FUSIONS = ("add", "warp")
# where the latent's motion comes from: 'learned' (the official encoder), 'measured' (ours: channels 0-1
# hold the clip's measured global motion, motion.py), 'measured+objects' (ours: channels 2-3 also hold
# the measured motion of what moves against the camera, per latent cell), 'measured-similarity+objects'
# (ours: that with the camera's pan, zoom and roll held per latent cell) or 'measured-similarity+fine-objects'
# (ours: that with one steady object motion per quarter of a latent cell in channels 2-9); the measured kinds need
# a warp level and this many channels (motion.MAX_UNITS / MAX_OBJECT_UNITS keep the motion channels'
# share of the latent's variance below 1 at 16; for '+fine-objects' with a steady camera, not in the worst
# case the clamps allow: motion.py)
LATENT_MOTION_KINDS = ("learned", "measured", "measured+objects", "measured-similarity+objects",
                       "measured-similarity+fine-objects")
# how the decoder spreads a measured motion over the frames and pixels (ours, motion.py): each latent
# frame's held over its frames ('held') or linear between the latent frames and cells ('linear')
MOTION_INTERPOLATIONS = ("held", "linear")
MIN_MEASURED_MOTION_CHANNELS = 16


def level_fuse_types(fuse_type, levels: int) -> list:
    """``ddconfig.fuse_type`` (one string, None, or one entry per decoder level) as one entry per level."""
    return list(fuse_type) if isinstance(fuse_type, (list, tuple)) else [fuse_type] * levels


def fusion_parts(kind) -> tuple:
    """The fusion blocks of one level's kind, in module order: 'attn+warp' -> ('attn', 'warp')."""
    return tuple(str(kind).split("+")) if kind else ()
_VIDEO_KEYS = {"ch", "ch_in", "f_t", "f_s", "out_ch", "z_channels", "temp_res", "ch_mult", "ch_fuse",
               "fuse_type", "num_res_blocks", "fuse_mid", "fuse_mid_type", "window_size", "tanh_out",
               "in_channels", "content_position", "norm_groups", "latent_motion", "motion_interpolation",
               "composite_output"}
_CONTENT_KEYS = {"ch", "ch_mult", "num_res_blocks", "out_z", "window_size", "f_s", "fs", "in_channels"}
_INERT_CONTENT_KEYS = {"z_channels", "out_ch", "resolution", "attn_resolutions", "dropout",
                       "use_checkpoint", "fp32_attention", "double_z", "resamp_with_conv", "temp_res",
                       "use_3d_conv"}
_TOP_KEYS = {"ddconfig", "ddconfig_2d", "embed_dim", "use_tiling", "tile_sample_min_size", "tile_overlap_factor",
             "enable_2d", "mode", "ckpt_path"}

# Sane bounds, far above the official models (6 / 4 levels, 2 ResNet blocks, widths <= 512, 16
# frames): a config from a file decides how many modules are built and how large the fixed
# sinusoid tables are, so every size it can claim is bounded before anything is built.
MAX_LEVELS = 8
MAX_RES_BLOCKS = 16
MAX_WIDTH = 4096
MAX_CLIP_FRAMES = 256
MAX_LATENT_CHANNELS = 1024
MAX_IO_CHANNELS = 64
MAX_WINDOW = 4096
MAX_TILE_SIZE = 16384
GROUPS = 32  # GroupNorm(32, ...) needs every ResNet width to be a multiple of 32

TILING_AUTO = "auto"
TILING_POLICIES = (True, False, TILING_AUTO)
_FIX = "correct the config (safetensors metadata 'reducio_config', the sidecar .json or config=...)"


def _check_window(field: str, value) -> None:
    if isinstance(value, (list, tuple)):
        check_int_list(field, value, 1, MAX_WINDOW, 2, 2, _FIX)
    else:
        check_int(field, value, 1, MAX_WINDOW, _FIX)


def _check_widths(field: str, base: int, mults: list) -> None:
    for width in [base] + [base * m for m in mults]:
        if width > MAX_WIDTH or width % GROUPS:
            raise ConfigError(f"config field {field} = {base} with ch_mult {mults} gives a {width}-channel level: "
                              f"every width must be a multiple of {GROUPS} (GroupNorm groups) and at most "
                              f"{MAX_WIDTH}; {_FIX}")


def check_ddconfig(ddconfig) -> None:
    """The video-branch options (``ddconfig``): types, bounds, and only what this port implements."""
    check_mapping("ddconfig", ddconfig)
    check_known_fields("ddconfig", ddconfig, _VIDEO_KEYS | _INERT_VIDEO_KEYS | set(_FIXED_VIDEO_OPTIONS), _FIX)
    for key in ("ch", "ch_mult", "ch_fuse", "num_res_blocks", "z_channels", "temp_res"):
        if key not in ddconfig:
            raise ConfigError(f"config field ddconfig.{key} is missing; {_FIX}")
    for key, allowed in _FIXED_VIDEO_OPTIONS.items():
        if key in ddconfig and (isinstance(ddconfig[key], (list, dict)) or ddconfig[key] not in allowed):
            raise ConfigError(
                f"config field ddconfig.{key} = {ddconfig[key]!r} is not supported: the official Reducio models use "
                f"{sorted(map(str, allowed))} and nothing else is implemented; {_FIX}")
    mults = check_int_list("ddconfig.ch_mult", ddconfig["ch_mult"], 1, 64, 1, MAX_LEVELS, _FIX)
    levels = len(mults)
    ch = check_int("ddconfig.ch", ddconfig["ch"], 1, MAX_WIDTH, _FIX)
    _check_widths("ddconfig.ch", ch, mults)
    if ddconfig.get("ch_in") is not None:
        _check_widths("ddconfig.ch_in", check_int("ddconfig.ch_in", ddconfig["ch_in"], 1, MAX_WIDTH, _FIX), mults)
    check_int("ddconfig.num_res_blocks", ddconfig["num_res_blocks"], 1, MAX_RES_BLOCKS, _FIX)
    check_int("ddconfig.z_channels", ddconfig["z_channels"], 1, MAX_LATENT_CHANNELS, _FIX)
    for key in ("out_ch", "in_channels"):
        if key in ddconfig:
            check_int(f"ddconfig.{key}", ddconfig[key], 1, MAX_IO_CHANNELS, _FIX)
    f_t = check_int("ddconfig.f_t", ddconfig.get("f_t", 0), 0, levels - 1,
                    "the temporal factor needs one encoder level per halving")
    if "f_s" in ddconfig:
        check_int("ddconfig.f_s", ddconfig["f_s"], 0, levels - 1, "the spatial factor needs one level per halving")
    temp_res = check_int("ddconfig.temp_res", ddconfig["temp_res"], 1, MAX_CLIP_FRAMES, _FIX)
    if temp_res % 2 ** f_t:
        raise ConfigError(f"config field ddconfig.temp_res = {temp_res} is not divisible by 2**f_t = {2 ** f_t}; {_FIX}")
    fuse = check_int_list("ddconfig.ch_fuse", ddconfig["ch_fuse"], -1, MAX_LEVELS, levels, levels,
                          f"one entry per ch_mult level ({levels}): -1 or a content level; {_FIX}")
    fuse_type = ddconfig.get("fuse_type", "attn")
    types = level_fuse_types(fuse_type, levels)
    if len(types) != levels:
        raise ConfigError(f"config field ddconfig.fuse_type needs one entry per level ({levels}); {_FIX}")
    for level, (kind, index) in enumerate(zip(types, fuse)):
        if index >= 0 and (not isinstance(kind, str) or kind not in FUSE_TYPES):
            raise ConfigError(f"config field ddconfig.fuse_type = {kind!r} at decoder level {level} is not supported: "
                              f"one of {list(FUSE_TYPES)} (the official models use 'attn'); {_FIX}")
        if index >= 0 and set(fusion_parts(kind)) & set(SAME_LEVEL_FUSIONS) and index != level:
            raise ConfigError(f"config field ddconfig.ch_fuse[{level}] = {index}: {kind!r} fusion needs the "
                              f"content level of the same resolution, {level}; {_FIX}")
    for key in ("fuse_mid", "tanh_out"):
        if key in ddconfig:
            check_bool(f"ddconfig.{key}", ddconfig[key], _FIX)
    if "content_position" in ddconfig:
        # ours (the embedded tiny model): a fixed 2-D position code in the fusion blocks
        check_choice("ddconfig.content_position", ddconfig["content_position"], ["none", "sincos2d"], _FIX)
    if ddconfig.get("fuse_mid_type") is not None:
        check_choice("ddconfig.fuse_mid_type", ddconfig["fuse_mid_type"], ["attn"], _FIX)
    if "window_size" in ddconfig:
        _check_window("ddconfig.window_size", ddconfig["window_size"])


def check_content_config(ddconfig_2d) -> None:
    """The content-branch options (``ddconfig_2d``)."""
    check_mapping("ddconfig_2d", ddconfig_2d)
    check_known_fields("ddconfig_2d", ddconfig_2d, _CONTENT_KEYS | _INERT_CONTENT_KEYS, _FIX)
    for key in ("ch", "ch_mult", "num_res_blocks"):
        if key not in ddconfig_2d:
            raise ConfigError(f"config field ddconfig_2d.{key} is missing; {_FIX}")
    if ddconfig_2d.get("out_z", False) is not False:
        raise ConfigError("config field ddconfig_2d.out_z must be false: the latent content branch (out_z true) is "
                          "not implemented; the official models use the content feature pyramid")
    mults = check_int_list("ddconfig_2d.ch_mult", ddconfig_2d["ch_mult"], 1, 64, 1, MAX_LEVELS, _FIX)
    ch = check_int("ddconfig_2d.ch", ddconfig_2d["ch"], 1, MAX_WIDTH, _FIX)
    _check_widths("ddconfig_2d.ch", ch, mults)
    check_int("ddconfig_2d.num_res_blocks", ddconfig_2d["num_res_blocks"], 1, MAX_RES_BLOCKS, _FIX)
    if "f_s" in ddconfig_2d:
        check_int("ddconfig_2d.f_s", ddconfig_2d["f_s"], 0, len(mults) - 1, _FIX)
    if "in_channels" in ddconfig_2d:
        check_int("ddconfig_2d.in_channels", ddconfig_2d["in_channels"], 1, MAX_IO_CHANNELS, _FIX)
    if "window_size" in ddconfig_2d:
        _check_window("ddconfig_2d.window_size", ddconfig_2d["window_size"])


def validate_config(config) -> dict:
    """Check constructor kwargs completely (types, bounds, supported options, consistency of the two
    branches) and return them as a plain dict; raises ConfigError naming the field. Run before a
    model is built from a config that came from a file."""
    check_mapping("config", config)
    check_known_fields("", config, _TOP_KEYS | TRAINING_ONLY_KWARGS, _FIX)
    for key in ("ddconfig", "ddconfig_2d", "embed_dim"):
        if key not in config:
            raise ConfigError(f"config field {key} is missing: a Reducio VAE config needs ddconfig, ddconfig_2d and "
                              f"embed_dim; {_FIX}")
    dd, dd2 = config["ddconfig"], config["ddconfig_2d"]
    check_ddconfig(dd)
    check_content_config(dd2)
    check_int("embed_dim", config["embed_dim"], 1, MAX_LATENT_CHANNELS, _FIX)
    n2 = len(dd2["ch_mult"])
    for level, index in enumerate(dd["ch_fuse"]):
        if index >= n2:
            raise ConfigError(f"config field ddconfig.ch_fuse[{level}] = {index} names content level {index}, but "
                              f"ddconfig_2d.ch_mult has only {n2} levels (use -1..{n2 - 1}); {_FIX}")
    if config.get("use_tiling", False) not in TILING_POLICIES or not isinstance(config.get("use_tiling", False),
                                                                               (bool, str)):
        raise ConfigError(f"config field use_tiling = {config['use_tiling']!r} is invalid: expected true, false or "
                          f"'{TILING_AUTO}'; {_FIX}")
    if dd.get("latent_motion", "learned") != "learned":
        # ours (the embedded tiny model): measured motion channels, see motion.py
        check_choice("ddconfig.latent_motion", dd["latent_motion"], list(LATENT_MOTION_KINDS), _FIX)
        kinds = level_fuse_types(dd.get("fuse_type", "attn"), len(dd["ch_mult"]))
        if not any("warp" in fusion_parts(kind) for kind, index in zip(kinds, dd["ch_fuse"]) if index >= 0):
            raise ConfigError(f"config field ddconfig.latent_motion = {dd['latent_motion']!r} needs a decoder level "
                              f"with 'warp' fusion (ddconfig.fuse_type) to read the motion; {_FIX}")
        if config["embed_dim"] < MIN_MEASURED_MOTION_CHANNELS:
            raise ConfigError(f"config field embed_dim = {config['embed_dim']} is too small for "
                              f"ddconfig.latent_motion = {dd['latent_motion']!r}: it needs at least "
                              f"{MIN_MEASURED_MOTION_CHANNELS} latent channels; {_FIX}")
    if "motion_interpolation" in dd:
        check_choice("ddconfig.motion_interpolation", dd["motion_interpolation"], list(MOTION_INTERPOLATIONS), _FIX)
        if dd["motion_interpolation"] != "held" and dd.get("latent_motion", "learned") == "learned":
            raise ConfigError(f"config field ddconfig.motion_interpolation = {dd['motion_interpolation']!r} needs a measured "
                              f"ddconfig.latent_motion ({', '.join(LATENT_MOTION_KINDS[1:])}); {_FIX}")
    if dd.get("composite_output", False) is not False:
        # ours (the embedded tiny model): the output mixes in the content frame moved by the decoder's flows
        # (FusionDecoder's composite output)
        if dd["composite_output"] is not True:
            raise ConfigError(f"config field ddconfig.composite_output = {dd['composite_output']!r} is invalid: "
                              f"expected true or false; {_FIX}")
        if dd.get("latent_motion", "learned") == "learned":
            raise ConfigError(f"config field ddconfig.composite_output needs a measured ddconfig.latent_motion "
                              f"({', '.join(LATENT_MOTION_KINDS[1:])}): it moves the content frame by the measured "
                              f"motion; {_FIX}")
        if dd.get("tanh_out", False):
            raise ConfigError(f"config fields ddconfig.composite_output and ddconfig.tanh_out cannot both be true "
                              f"(the mix of content pictures already lies in [-1, 1]); {_FIX}")
    if "norm_groups" in dd:
        # ours (the embedded tiny model): the GroupNorm group count of all three branches (official: 32)
        groups = check_int("ddconfig.norm_groups", dd["norm_groups"], 1, 1024, _FIX)
        widths = {dd["ch"], dd.get("ch_in") or dd["ch"], dd2["ch"]}
        widths |= {dd["ch"] * m for m in dd["ch_mult"]} | {(dd.get("ch_in") or dd["ch"]) * m for m in dd["ch_mult"]}
        widths |= {dd2["ch"] * m for m in dd2["ch_mult"]}
        uneven = sorted(w for w in widths if w % groups)
        if uneven:
            raise ConfigError(f"config field ddconfig.norm_groups = {groups} does not divide the channel widths "
                              f"{uneven}; choose a divisor of every width (official: 32); {_FIX}")
    factor = 2 ** dd.get("f_s", len(dd["ch_mult"]) - 1)
    check_int("tile_sample_min_size", config.get("tile_sample_min_size", 256), factor, MAX_TILE_SIZE, _FIX)
    # (whether the tile window lines up with the latent grid is checked by TileLayout when tiling is used:
    # the official code default overlap 0.2 does not, and only matters for tiled calls)
    check_number("tile_overlap_factor", config.get("tile_overlap_factor", 0.2), 0.0, 1.0, _FIX, high_open=True)
    if config.get("enable_2d", True) is not True:
        raise ConfigError("config field enable_2d must be true: every official Reducio model decodes with a content "
                          "frame (enable_2d false is not implemented)")
    if config.get("mode", "full") != "full":
        raise ConfigError(f"config field mode = {config['mode']!r} is not implemented; the official models use 'full'")
    if config.get("ckpt_path") is not None:
        raise ConfigError("config field ckpt_path is not supported (the official loader is not strict); load the "
                          "weights with ReducioVAE.from_pretrained(path)")
    return dict(config)
