"""A small class-conditional image DiT, trained here, for measuring DiTFastAttn on learned attention.

Random DiTs attend almost uniformly, so their compression errors say nothing; the tiny Reducio-DiT
has 16 latent tokens. This model has 1,024: 64x64 RGB pixels, patch 2 (a 32x32 token grid).

The architecture is facebookresearch/DiT's (patchify, fixed 2-D sin-cos positions, adaLN-Zero
blocks, a class embedding with one extra "null" class for classifier-free guidance), predicting
epsilon only. The attention core is a parameter of `forward` (`attend`), so the same weights run
with plain SDPA or through fastattn's runtime, the seam ComfyUI's override and Reducio-DiT use.
No I/O here: data, training and sampling are in `bench.image_dit_train`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# attend(q, k, v, *, layer, heads) -> out, all [B, L, heads * head_dim]
Attend = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ImageDiTConfig:
    image_size: int = 64
    patch_size: int = 2
    channels: int = 3
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 4
    num_classes: int = 13

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid ** 2

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "ImageDiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in metadata.items() if k in names})


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(yy), axis(xx)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, x: torch.Tensor, layer: int, attend: Optional[Attend]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if attend is not None:
            return self.proj(attend(q, k, v, layer=layer, heads=self.heads))
        b, n, c = q.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x, c, layer: int, attend: Optional[Attend]):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1), layer, attend)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ImageDiT(nn.Module):
    def __init__(self, config: ImageDiTConfig):
        super().__init__()
        self.config = config
        hidden, patch = config.hidden, config.patch_size
        self.patchify = nn.Conv2d(config.channels, hidden, patch, stride=patch)
        self.register_buffer("positions", sincos_2d(hidden, config.grid), persistent=False)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.classes = nn.Embedding(config.num_classes + 1, hidden)   # last index: the null class
        self.blocks = nn.ModuleList(Block(hidden, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch * patch * config.channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: xavier linears, adaLN-Zero (every block starts as the identity)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.weight.shape[0], -1))
        nn.init.normal_(self.classes.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, attend: Optional[Attend] = None):
        """Epsilon for images x [B, C, H, W] at integer timesteps t [B] and classes y [B]."""
        cfg = self.config
        if tuple(x.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"ImageDiT takes [B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}] "
                             f"images, got {list(x.shape)}")
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.positions
        c = self.time(timestep_embedding(t, cfg.hidden)) + self.classes(y)
        for layer, block in enumerate(self.blocks):
            tokens = block(tokens, c, layer, attend)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))
        b, p, g = x.shape[0], cfg.patch_size, cfg.grid
        out = out.view(b, g, g, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.channels, cfg.image_size, cfg.image_size)
