"""Reducio-DiT model configuration: the fields stored in every checkpoint, and the named presets.

Every architectural choice the paper leaves open is a field here (see ``shared/spec/reducio_dit.md``
§4.8): a checkpoint carries its complete config as JSON, so a model built from it needs nothing else.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..validation import (ConfigError, check_bool, check_choice, check_int, check_int_list, check_known_fields,
                          check_mapping, check_number, parse_json_object)

# Sane bounds, far above the official XL model (depth 28, hidden 1152, 16 heads, 120 T5 tokens, 256
# CLIP tokens): a config from a file decides how many blocks are built, so each size is bounded and
# the depth must equal the number of blocks the file really holds (reducio.dit.checkpoint).
MAX_DEPTH = 256
MAX_HIDDEN = 16384
MAX_TOKENS = 4096
MAX_CHANNELS = 16384
MAX_LATENT_CHANNELS = 1024
MAX_FRAMES = 1024
MAX_PATCH = 64
_FIX = "correct the config (the checkpoint's 'config' metadata or the config you passed)"


def _default_cfg_dropout() -> dict[str, float]:
    return {"text": 0.1, "clip": 0.05, "content": 0.05, "all": 0.05}


def _default_inference() -> dict[str, Any]:
    return {
        "sampler": "dpmpp_2m",
        "steps": 20,
        "scheduler": "normal",
        "cfg": 4.5,
        "cfg_mode": "text",          # "text": uncond drops the text only; "all": drops every source
        "negative_text": "null",     # "null": learned null text for uncond; "prompt": the negative prompt
        "renormalize_latent": True,  # layer-norm the sampled latent before the VAE decode (§2.1 step 4)
    }


@dataclass
class ReducioDiTConfig:
    # backbone
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # latent
    in_channels: int = 16
    learn_sigma: bool = True
    patch_size: tuple[int, int, int] = (1, 1, 1)
    num_frames: int = 16
    latent_frames: int = 4
    content_frame_index: int = 7
    # how many pixels one latent cell spans (32 for the official Reducio VAEs); used by front ends
    # to size the empty latent, not by the network itself
    vae_spatial_factor: int = 32
    # positions
    pe_base_size: float = 32.0
    pe_interpolation: float = 1.0
    temporal_pe: str = "sincos"
    # conditions
    caption_channels: int = 4096
    text_tokens: int = 120
    clip_channels: int = 1280
    clip_tokens: int = 256
    # "tokens": the CLIP image tokens condition the model (the paper); "null": a reduced conditioning
    # in which the model always uses its learned null CLIP embedding and ignores the tokens it is
    # given (for small models trained without a real CLIP image encoder; see docs/reducio_dit.md)
    clip_condition: str = "tokens"
    content_channels: int = 4
    content_patch: int = 2
    content_latent_scale: float = 0.18215
    content_groups: Any = "auto"          # "auto", 1 or 4
    content_group_min_area: int = 524288  # pixels (H*W) from which "auto" splits into 4 groups
    cfg_dropout: dict = field(default_factory=_default_cfg_dropout)
    # diffusion
    prediction: str = "eps"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    micro_condition: bool = False
    vae: str = "reducio-ft4"
    inference: dict = field(default_factory=_default_inference)

    def __post_init__(self):
        check_int_list("patch_size", self.patch_size, 1, MAX_PATCH, 3, 3,
                       "three positive ints (pt, ph, pw), e.g. [1, 1, 1]")
        self.patch_size = tuple(self.patch_size)
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def groups_for_image(self, height: int, width: int) -> int:
        """Number of content-token groups for a video of ``height`` x ``width`` pixels (§4.6)."""
        if self.content_groups == "auto":
            return 4 if height * width >= self.content_group_min_area else 1
        return int(self.content_groups)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Types and bounds of every field first (so a hostile file gets a ConfigError naming the field,
        never a TypeError or ZeroDivisionError), then the relations between fields."""
        check_int("depth", self.depth, 1, MAX_DEPTH, _FIX)
        check_int("hidden_size", self.hidden_size, 4, MAX_HIDDEN, _FIX)
        check_int("num_heads", self.num_heads, 1, self.hidden_size, "at least 1 attention head; " + _FIX)
        check_number("mlp_ratio", self.mlp_ratio, 0.0, 64.0, _FIX, low_open=True)
        check_int("in_channels", self.in_channels, 1, MAX_LATENT_CHANNELS, _FIX)
        check_bool("learn_sigma", self.learn_sigma, _FIX)
        check_int("num_frames", self.num_frames, 1, MAX_FRAMES, _FIX)
        check_int("latent_frames", self.latent_frames, 1, MAX_FRAMES, _FIX)
        check_int("content_frame_index", self.content_frame_index, 0, self.num_frames - 1,
                  "an index into the num_frames frames of a clip")
        check_int("vae_spatial_factor", self.vae_spatial_factor, 1, 1024, _FIX)
        check_number("pe_base_size", self.pe_base_size, 0.0, 1e6, _FIX, low_open=True)
        check_number("pe_interpolation", self.pe_interpolation, 0.0, 1e6, _FIX, low_open=True)
        check_choice("temporal_pe", self.temporal_pe, ["sincos", "none"], _FIX)
        check_choice("clip_condition", self.clip_condition, ["tokens", "null"], _FIX)
        for name in ("caption_channels", "clip_channels"):
            check_int(name, getattr(self, name), 1, MAX_CHANNELS, _FIX)
        for name in ("text_tokens", "clip_tokens"):
            check_int(name, getattr(self, name), 1, MAX_TOKENS, _FIX)
        check_int("content_channels", self.content_channels, 1, 64, _FIX)
        check_int("content_patch", self.content_patch, 1, MAX_PATCH, _FIX)
        check_number("content_latent_scale", self.content_latent_scale, 0.0, 1e6, _FIX, low_open=True)
        if isinstance(self.content_groups, bool):
            raise ConfigError(f"config field content_groups = {self.content_groups!r} is invalid: expected 'auto', 1 "
                              "or 4")
        check_choice("content_groups", self.content_groups, ["auto", 1, 4], _FIX)
        check_int("content_group_min_area", self.content_group_min_area, 1, 2 ** 40, _FIX)
        check_mapping("cfg_dropout", self.cfg_dropout)
        check_known_fields("cfg_dropout", self.cfg_dropout, _default_cfg_dropout(), _FIX)
        for name, rate in self.cfg_dropout.items():
            check_number(f"cfg_dropout.{name}", rate, 0.0, 1.0, _FIX)
        check_choice("prediction", self.prediction, ["eps"], "only eps prediction is implemented")
        check_int("num_train_timesteps", self.num_train_timesteps, 1, 100000, _FIX)
        check_choice("beta_schedule", self.beta_schedule, ["linear"], "only the linear beta schedule is implemented")
        check_number("beta_start", self.beta_start, 0.0, 1.0, _FIX, low_open=True, high_open=True)
        check_number("beta_end", self.beta_end, 0.0, 1.0, _FIX, low_open=True, high_open=True)
        check_bool("micro_condition", self.micro_condition, _FIX)
        if not isinstance(self.vae, str):
            raise ConfigError(f"config field vae = {self.vae!r} is invalid: expected a name such as 'reducio-ft4'")
        self._check_inference()

        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            # the 2-D sin-cos code splits D in two halves, each [sin | cos]
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos positions")
        if self.beta_start >= self.beta_end:
            problems.append(f"beta_start {self.beta_start} must be below beta_end {self.beta_end}")
        if self.micro_condition:
            problems.append("micro_condition is reserved and not implemented")
        if problems:
            raise ConfigError("invalid Reducio-DiT config: " + "; ".join(problems))

    def _check_inference(self) -> None:
        check_mapping("inference", self.inference)
        check_known_fields("inference", self.inference, _default_inference(), _FIX)
        settings = self.inference
        for name in ("sampler", "scheduler"):
            if name in settings and not isinstance(settings[name], str):
                raise ConfigError(f"config field inference.{name} = {settings[name]!r} is invalid: expected a name")
        if "steps" in settings:
            check_int("inference.steps", settings["steps"], 1, 10000, _FIX)
        if "cfg" in settings:
            check_number("inference.cfg", settings["cfg"], 0.0, 100.0, _FIX)
        if "cfg_mode" in settings:
            check_choice("inference.cfg_mode", settings["cfg_mode"], ["text", "all"], _FIX)
        if "negative_text" in settings:
            check_choice("inference.negative_text", settings["negative_text"], ["null", "prompt"], _FIX)
        if "renormalize_latent" in settings:
            check_bool("inference.renormalize_latent", settings["renormalize_latent"], _FIX)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReducioDiTConfig":
        check_mapping("config", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown Reducio-DiT config fields: {unknown}; known fields: {sorted(known)}")
        data = copy.deepcopy(dict(data))
        if "inference" in data:
            check_mapping("inference", data["inference"])
            data["inference"] = {**_default_inference(), **data["inference"]}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ReducioDiTConfig":
        return cls.from_dict(parse_json_object(text, "Reducio-DiT config"))

    def replace(self, **changes) -> "ReducioDiTConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)


def _xl() -> ReducioDiTConfig:
    return ReducioDiTConfig()


def _small() -> ReducioDiTConfig:
    return ReducioDiTConfig(depth=8, hidden_size=384, num_heads=6)


def _tiny() -> ReducioDiTConfig:
    # depth 4 exercises all four content groups; tiny condition widths keep CPU tests fast
    return ReducioDiTConfig(depth=4, hidden_size=64, num_heads=4, caption_channels=32, text_tokens=8,
                            clip_channels=32, clip_tokens=4)


NAMED_CONFIGS = {"XL": _xl, "small": _small, "tiny": _tiny}


def get_config(name: str, **overrides) -> ReducioDiTConfig:
    """A named preset (``XL``, ``small``, ``tiny``), optionally with fields overridden."""
    try:
        factory = NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown Reducio-DiT config {name!r}; choose one of {sorted(NAMED_CONFIGS)}") from None
    cfg = factory()
    return cfg.replace(**overrides) if overrides else cfg
