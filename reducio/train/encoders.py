"""Condition encoders for DiT features: a pluggable interface and a deterministic built-in set.

``encode`` calls a :class:`ConditionEncoders`: captions -> text tokens + mask, content images ->
CLIP-style tokens and the raw content latent (the SD-VAE latent slot, 4 x H/8 x W/8, unscaled). Real
encoders (T5, OpenCLIP, SD-VAE) plug in through ``--encoders package.module:factory``: ``factory(dit_config)``
returns an object with the three methods and a ``describe()`` dict (stored in the features and checked
by ``dit``).

The built-in set needs no weights and is fully deterministic (fixed seeds), sized by the DiT config:

* text: lower-cased words minus a few stop words; each word -> a fixed random unit vector seeded by its
  SHA-256, plus a sin-cos code of its position; padded/truncated to ``text_tokens`` (mask 1 = word);
* image tokens: the image as a g x g grid (g^2 = ``clip_tokens``); each cell average-pooled to 4 x 4 RGB
  -> a fixed random projection to ``clip_channels`` -> LayerNorm (as CLIP's ``ln_post``);
* content latent: 8 x 8 average pool of RGB plus the per-block luminance standard deviation, divided by
  the DiT's ``content_latent_scale`` so the model's own scaling brings it back to unit range.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import re

import torch
import torch.nn.functional as F

STOP_WORDS = frozenset({"the", "a", "an", "over", "of", "on", "and", "photo", "moves", "view"})


def _seeded(seed_text: str, shape) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8")).digest()[:8], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class BuiltinEncoders:
    name = "builtin"
    version = 1

    def __init__(self, dit_config):
        self.text_tokens, self.caption_channels = dit_config.text_tokens, dit_config.caption_channels
        self.clip_tokens, self.clip_channels = dit_config.clip_tokens, dit_config.clip_channels
        self.content_channels, self.scale = dit_config.content_channels, dit_config.content_latent_scale
        self.grid = int(round(math.sqrt(self.clip_tokens)))
        if self.grid * self.grid != self.clip_tokens:
            raise ValueError(f"the built-in image encoder needs a square clip_tokens (4, 16, 256, ...), "
                             f"got {self.clip_tokens}")
        if self.content_channels != 4:
            raise ValueError("the built-in content encoder makes 4 channels (the SD-VAE layout)")
        self.projection = _seeded("reducio-builtin-clip", (48, self.clip_channels)) / math.sqrt(48)
        self._words: dict[str, torch.Tensor] = {}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "text_tokens": self.text_tokens,
                "caption_channels": self.caption_channels, "clip_tokens": self.clip_tokens,
                "clip_channels": self.clip_channels, "content_channels": self.content_channels}

    @staticmethod
    def words(caption: str) -> list[str]:
        return [w for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOP_WORDS]

    def _word(self, word: str) -> torch.Tensor:
        if word not in self._words:
            vector = _seeded(f"reducio-builtin-word:{word}", (self.caption_channels,))
            self._words[word] = vector / vector.norm()
        return self._words[word]

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(len(captions), self.text_tokens, self.caption_channels)
        mask = torch.zeros(len(captions), self.text_tokens)
        half = self.caption_channels // 2
        freqs = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / max(half, 1))
        for row, caption in enumerate(captions):
            for position, word in enumerate(self.words(caption)[: self.text_tokens]):
                angle = position * freqs
                code = torch.cat([angle.sin(), angle.cos()])[: self.caption_channels]
                tokens[row, position] = self._word(word) + 0.1 * F.pad(code, (0, self.caption_channels - code.numel()))
                mask[row, position] = 1.0
        return tokens, mask

    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(images.float(), self.grid * 4)                 # [B, 3, 4g, 4g]
        batch = cells.shape[0]
        cells = cells.reshape(batch, 3, self.grid, 4, self.grid, 4).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, 48)
        return F.layer_norm(cells @ self.projection, (self.clip_channels,))

    def encode_content(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        mean = F.avg_pool2d(images, 8)
        luma = images.mean(1, keepdim=True)
        std = (F.avg_pool2d(luma.pow(2), 8) - F.avg_pool2d(luma, 8).pow(2)).clamp(min=0).sqrt()
        return torch.cat([mean, std * 4 - 1], dim=1) / self.scale


def make_encoders(spec: str, dit_config):
    """``builtin`` or ``package.module:factory`` (called with the DiT config)."""
    if spec == "builtin":
        return BuiltinEncoders(dit_config)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--encoders must be 'builtin' or 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    encoders = factory(dit_config)
    for method in ("encode_text", "encode_clip", "encode_content", "describe"):
        if not callable(getattr(encoders, method, None)):
            raise TypeError(f"{spec} returned {type(encoders).__name__} without a {method}() method")
    return encoders
