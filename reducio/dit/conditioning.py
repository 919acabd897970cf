"""The cross-attention context of Reducio-DiT (spec §4.6).

Three sources, each with a learned null used for classifier-free guidance (§5.4):

* text: T5 tokens ``[B, L, caption_channels]`` (padded / truncated to ``text_tokens``) + mask, through
  PixArt's caption MLP; null = ``y_embedder.y_embedding`` with an all-ones mask;
* CLIP: OpenCLIP ViT-H/14 patch tokens ``[B, clip_tokens, clip_channels]`` (after ``ln_post``, CLS
  excluded), through a new MLP; null = ``clip_embedder.null_embedding``;
* content: the *raw* SD-VAE latent of the content image ``[B, 4, H/8, W/8]``, scaled by
  ``content_latent_scale`` here, patchified 2x2, plus 2-D sin-cos positions, GELU, Linear;
  null = ``content_embedder.null_latent`` (one value per channel) broadcast over the grid.

At >= 1024 px the content grid is split 2x2-strided into four groups; block ``l`` attends to group
``l mod 4`` (reading (a) of the paper's DeepStack-like remark). Positions are added on the full grid
first, so every group keeps its true positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ReducioDiTConfig
from .embeddings import sincos_2d

# The SD VAE that produces the content latent downsamples by 8 (spec §2.3).
CONTENT_VAE_FACTOR = 8


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _where_rows(drop: torch.Tensor | None, null: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per batch row: ``null`` where ``drop`` is true, else ``real`` (``null`` broadcasts over rows)."""
    if drop is None:
        return real
    drop = drop.to(device=real.device, dtype=torch.bool).reshape(-1, *([1] * (real.ndim - 1)))
    return torch.where(drop, null.to(dtype=real.dtype, device=real.device).expand_as(real), real)


class Mlp2(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (PixArt's caption MLP layout; key names fc1 / fc2)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, operations, device=None, dtype=None):
        super().__init__()
        self.fc1 = operations.Linear(in_features, hidden, bias=True, device=device, dtype=dtype)
        self.fc2 = operations.Linear(hidden, out_features, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu_tanh(self.fc1(x)))


class TextEmbedder(nn.Module):
    def __init__(self, cfg: ReducioDiTConfig, operations, device=None, dtype=None):
        super().__init__()
        self.text_tokens = cfg.text_tokens
        self.y_proj = Mlp2(cfg.caption_channels, cfg.hidden_size, cfg.hidden_size, operations, device, dtype)
        self.y_embedding = nn.Parameter(torch.empty(cfg.text_tokens, cfg.caption_channels, device=device, dtype=dtype))

    def fit_length(self, text: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (zeros, mask 0) or truncate the token axis to ``text_tokens``; build an all-ones mask if none."""
        batch, length = text.shape[:2]
        if mask is None:
            mask = torch.ones(batch, length, device=text.device, dtype=torch.float32)
        mask = mask.to(device=text.device, dtype=torch.float32).reshape(batch, length)
        if length > self.text_tokens:
            text, mask = text[:, : self.text_tokens], mask[:, : self.text_tokens]
        elif length < self.text_tokens:
            pad = self.text_tokens - length
            text = F.pad(text, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
        return text, mask

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None, drop: torch.Tensor | None):
        """Returns tokens ``[B, text_tokens, D]`` and a float mask ``[B, text_tokens]`` (1 = attend)."""
        text, mask = self.fit_length(text, mask)
        text = _where_rows(drop, self.y_embedding.unsqueeze(0), text)
        # a null text attends with all of its tokens, whatever the prompt's length (spec §4.6, D*)
        mask = _where_rows(drop, torch.ones_like(mask[:1]), mask)
        return self.y_proj(text), mask


class ClipEmbedder(nn.Module):
    def __init__(self, cfg: ReducioDiTConfig, operations, device=None, dtype=None):
        super().__init__()
        self.clip_tokens, self.clip_channels = cfg.clip_tokens, cfg.clip_channels
        self.ignore_tokens = cfg.clip_condition == "null"
        self.proj = Mlp2(cfg.clip_channels, cfg.hidden_size, cfg.hidden_size, operations, device, dtype)
        self.null_embedding = nn.Parameter(torch.empty(cfg.clip_tokens, cfg.clip_channels, device=device, dtype=dtype))

    def forward(self, clip: torch.Tensor | None, drop: torch.Tensor | None, batch: int, dtype, device):
        if clip is None or self.ignore_tokens:
            tokens = self.null_embedding.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, -1, -1)
        else:
            expected = (self.clip_tokens, self.clip_channels)
            if tuple(clip.shape[1:]) != expected:
                raise ValueError(f"CLIP tokens must be [B, {expected[0]}, {expected[1]}] (OpenCLIP ViT-H/14 patch "
                                 f"tokens after ln_post, CLS excluded), got {list(clip.shape)}")
            tokens = _where_rows(drop, self.null_embedding.unsqueeze(0), clip.to(dtype))
        return self.proj(tokens)


class ContentEmbedder(nn.Module):
    def __init__(self, cfg: ReducioDiTConfig, operations, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.proj = operations.Conv2d(cfg.content_channels, d, kernel_size=cfg.content_patch,
                                      stride=cfg.content_patch, bias=True, device=device, dtype=dtype)
        self.fc = operations.Linear(d, d, bias=True, device=device, dtype=dtype)
        self.null_latent = nn.Parameter(torch.empty(cfg.content_channels, device=device, dtype=dtype))

    def forward(self, latent: torch.Tensor, drop: torch.Tensor | None, groups: int) -> list[torch.Tensor]:
        """Raw SD-VAE latent ``[B, 4, H/8, W/8]`` -> ``groups`` token tensors ``[B, Nc/groups, D]``."""
        cfg = self.cfg
        if latent.ndim != 4 or latent.shape[1] != cfg.content_channels:
            raise ValueError(f"content latent must be [B, {cfg.content_channels}, H/8, W/8] (the raw SD-VAE latent "
                             f"of the content image), got {list(latent.shape)}")
        p = cfg.content_patch
        if latent.shape[-2] % p or latent.shape[-1] % p:
            raise ValueError(f"content latent size {list(latent.shape[-2:])} is not divisible by content_patch {p}")
        scaled = latent * cfg.content_latent_scale
        scaled = _where_rows(drop, self.null_latent.reshape(1, -1, 1, 1), scaled)
        tokens = self.proj(scaled)                                   # [B, D, Hc, Wc]
        batch, dim, grid_h, grid_w = tokens.shape
        pos = sincos_2d(grid_h, grid_w, dim, cfg.pe_base_size, cfg.pe_interpolation)
        tokens = tokens.flatten(2).transpose(1, 2) + pos.to(device=tokens.device, dtype=tokens.dtype)
        tokens = self.fc(_gelu_tanh(tokens))
        if groups == 1:
            return [tokens]
        if grid_h % 2 or grid_w % 2:
            raise ValueError(f"content grid {grid_h}x{grid_w} must be even on both axes to split into 4 groups "
                             "(use a video size that is a multiple of 32)")
        grid = tokens.reshape(batch, grid_h, grid_w, dim)
        return [grid[:, dy::2, dx::2].reshape(batch, -1, dim) for dy in (0, 1) for dx in (0, 1)]


@dataclass
class Context:
    """Per-group cross-attention context: block ``l`` uses ``tokens[l % len(tokens)]`` and ``mask``."""
    tokens: list[torch.Tensor]       # each [B, M, D]
    mask: torch.Tensor | None         # additive float mask [B, 1, 1, M], or None when nothing is masked

    def for_block(self, index: int) -> torch.Tensor:
        return self.tokens[index % len(self.tokens)]


def build_context(cfg: ReducioDiTConfig, y_embedder: TextEmbedder, clip_embedder: ClipEmbedder,
                  content_embedder: ContentEmbedder, *, batch: int, text: torch.Tensor,
                  text_mask: torch.Tensor | None, clip: torch.Tensor | None, content: torch.Tensor | None,
                  content_size: tuple[int, int], drop: dict[str, torch.Tensor | None],
                  dtype: torch.dtype, device: torch.device) -> Context:
    """Embed the three sources and concatenate them per block (text, CLIP, content group)."""
    text_tokens, mask = y_embedder(text.to(device=device, dtype=dtype), text_mask, drop.get("text"))
    clip_tokens = clip_embedder(None if clip is None else clip.to(device=device), drop.get("clip"), batch, dtype, device)
    if content is None:
        # no content image at all: every row uses the null latent on the grid the video implies
        content = torch.zeros(batch, cfg.content_channels, *content_size, device=device, dtype=dtype)
        content_drop = torch.ones(batch, dtype=torch.bool, device=device)
    else:
        content = content.to(device=device, dtype=dtype)
        content_drop = drop.get("content")
    height, width = content.shape[-2] * CONTENT_VAE_FACTOR, content.shape[-1] * CONTENT_VAE_FACTOR
    groups = cfg.groups_for_image(height, width)
    content_groups = content_embedder(content, content_drop, groups)
    shared = torch.cat([text_tokens, clip_tokens], dim=1)
    tokens = [torch.cat([shared, group], dim=1) for group in content_groups]

    additive = None
    # (on the meta device values are unknown, so build the mask to keep shapes honest)
    if mask.device.type == "meta" or bool((mask < 0.5).any()):
        keep = torch.cat([mask, mask.new_ones(batch, tokens[0].shape[1] - mask.shape[1])], dim=1)
        additive = torch.zeros(keep.shape, device=device, dtype=dtype)
        additive = additive.masked_fill(keep < 0.5, torch.finfo(dtype).min if dtype.is_floating_point else -math.inf)
        additive = additive.reshape(batch, 1, 1, -1)
    return Context(tokens=tokens, mask=additive)
