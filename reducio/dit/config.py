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
        self.patch_size = tuple(int(p) for p in self.patch_size)
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
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            # the 2-D sin-cos code splits D in two halves, each [sin | cos]
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos positions")
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            problems.append(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.temporal_pe not in ("sincos", "none"):
            problems.append(f"temporal_pe must be 'sincos' or 'none', got {self.temporal_pe!r}")
        if self.clip_condition not in ("tokens", "null"):
            problems.append(f"clip_condition must be 'tokens' or 'null', got {self.clip_condition!r}")
        if self.content_groups not in ("auto", 1, 4):
            problems.append(f"content_groups must be 'auto', 1 or 4, got {self.content_groups!r}")
        if self.prediction != "eps":
            problems.append(f"only prediction 'eps' is implemented, got {self.prediction!r}")
        if self.beta_schedule != "linear":
            problems.append(f"only beta_schedule 'linear' is implemented, got {self.beta_schedule!r}")
        if self.micro_condition:
            problems.append("micro_condition is reserved and not implemented")
        for name in ("depth", "in_channels", "caption_channels", "text_tokens", "clip_channels",
                     "clip_tokens", "content_channels", "content_patch"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if problems:
            raise ValueError("invalid Reducio-DiT config: " + "; ".join(problems))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReducioDiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Reducio-DiT config fields: {unknown}; known fields: {sorted(known)}")
        data = copy.deepcopy(dict(data))
        if "inference" in data:
            data["inference"] = {**_default_inference(), **data["inference"]}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ReducioDiTConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Reducio-DiT config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("Reducio-DiT config JSON must be an object")
        return cls.from_dict(data)

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
        raise ValueError(f"unknown Reducio-DiT config {name!r}; choose one of {sorted(NAMED_CONFIGS)}") from None
    cfg = factory()
    return cfg.replace(**overrides) if overrides else cfg
