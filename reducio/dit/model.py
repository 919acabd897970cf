"""Reducio-DiT: a PixArt-alpha-style diffusion transformer over Reducio motion latents.

Read top to bottom: ``TimestepEmbedder`` -> ``SelfAttention`` / ``CrossAttention`` / ``Mlp`` ->
``ReducioDiTBlock`` -> ``FinalLayer`` -> ``ReducioDiT``. The spec is ``shared/spec/reducio_dit.md``
(§4); checkpoint key names are the module paths below (§6).

Two seams make the module usable both stand-alone and as a native ComfyUI model:

* ``operations``: the namespace the Linear / Conv layers come from (default ``torch.nn``; ComfyUI passes
  ``comfy.ops.*`` so manual casting and low-VRAM weight streaming work);
* ``ReducioDiT.attention``: the ONE function every attention call goes through, given the layer index,
  the kind ("self" / "cross") and a per-call ``options`` dict. The default runs SDPA, or, for
  self-attention, a caller-supplied ``attention_fn(q, k, v, heads, *, layer, options)`` hook (how a
  DiTFastAttn plan applies in the stand-alone pipeline). The ComfyUI subclass overrides it to call
  ``comfy.ldm.modules.attention.optimized_attention`` with ``transformer_options``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import CONTENT_VAE_FACTOR, ClipEmbedder, Context, ContentEmbedder, TextEmbedder, build_context
from .config import ReducioDiTConfig
from .embeddings import sincos_3d, timestep_frequencies

# attention_fn(q, k, v, heads, *, layer, options) -> out; q/k/v and out are [B, L, heads * head_dim]
AttentionFn = Callable[..., torch.Tensor]

TIMESTEP_FREQUENCIES = 256
NORM_EPS = 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """PixArt's block norm: LayerNorm over the hidden size, eps 1e-6, no affine; computed in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """Plain scaled-dot-product attention on ``[B, L, heads*dim]`` tensors; ``mask`` is additive."""
    batch, q_len, width = q.shape
    dim = width // heads
    q, k, v = (t.reshape(batch, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, q_len, width)


class TimestepEmbedder(nn.Module):
    """t -> [cos | sin] frequencies (256) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden: int, operations, device=None, dtype=None):
        super().__init__()
        self.mlp = nn.Sequential(
            operations.Linear(TIMESTEP_FREQUENCIES, hidden, bias=True, device=device, dtype=dtype),
            nn.SiLU(),
            operations.Linear(hidden, hidden, bias=True, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, TIMESTEP_FREQUENCIES).to(dtype))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, operations, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.qkv = operations.Linear(hidden, 3 * hidden, bias=True, device=device, dtype=dtype)
        self.proj = operations.Linear(hidden, hidden, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)          # rows: q, k, v; head-major inside each
        return self.proj(attend(q, k, v, None, "self"))


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, operations, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.q_linear = operations.Linear(hidden, hidden, bias=True, device=device, dtype=dtype)
        self.kv_linear = operations.Linear(hidden, 2 * hidden, bias=True, device=device, dtype=dtype)
        self.proj = operations.Linear(hidden, hidden, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None, attend: Callable):
        k, v = self.kv_linear(context).chunk(2, dim=-1)  # rows: K first, then V
        return self.proj(attend(self.q_linear(x), k, v, mask, "cross"))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int, operations, device=None, dtype=None):
        super().__init__()
        self.fc1 = operations.Linear(hidden, inner, bias=True, device=device, dtype=dtype)
        self.fc2 = operations.Linear(inner, hidden, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ReducioDiTBlock(nn.Module):
    """adaLN-single block: gated self-attention, ungated cross-attention, gated MLP (spec §4.5)."""

    def __init__(self, cfg: ReducioDiTConfig, operations, device=None, dtype=None):
        super().__init__()
        d = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.empty(6, d, device=device, dtype=dtype))
        self.attn = SelfAttention(d, cfg.num_heads, operations, device, dtype)
        self.cross_attn = CrossAttention(d, cfg.num_heads, operations, device, dtype)
        self.mlp = Mlp(d, cfg.mlp_hidden, operations, device, dtype)

    def forward(self, x, t0, context, context_mask, attend):
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype).unsqueeze(0)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table + t0).unbind(dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulate(layer_norm(x), shift_msa.unsqueeze(1), scale_msa.unsqueeze(1)), attend)
        x = x + self.cross_attn(x, context, context_mask, attend)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(
            modulate(layer_norm(x), shift_mlp.unsqueeze(1), scale_mlp.unsqueeze(1)))
        return x


class FinalLayer(nn.Module):
    """LN modulated by t_emb (not t_block's output), then Linear to pt*ph*pw*out_channels."""

    def __init__(self, cfg: ReducioDiTConfig, operations, device=None, dtype=None):
        super().__init__()
        d = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.empty(2, d, device=device, dtype=dtype))
        self.linear = operations.Linear(d, math.prod(cfg.patch_size) * cfg.out_channels, bias=True,
                                        device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype).unsqueeze(0)
        shift, scale = (table + t_emb.unsqueeze(1)).unbind(dim=1)
        return self.linear(modulate(layer_norm(x), shift.unsqueeze(1), scale.unsqueeze(1)))


class ReducioDiT(nn.Module):
    def __init__(self, config: ReducioDiTConfig, operations=None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ReducioDiTConfig):
            raise TypeError(f"config must be a ReducioDiTConfig, got {type(config).__name__}")
        ops = operations if operations is not None else nn
        self.config = cfg = config
        d = cfg.hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                          bias=True, device=device, dtype=dtype)
        self.t_embedder = TimestepEmbedder(d, ops, device, dtype)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(d, 6 * d, bias=True, device=device, dtype=dtype))
        self.y_embedder = TextEmbedder(cfg, ops, device, dtype)
        self.clip_embedder = ClipEmbedder(cfg, ops, device, dtype)
        self.content_embedder = ContentEmbedder(cfg, ops, device, dtype)
        self.blocks = nn.ModuleList(ReducioDiTBlock(cfg, ops, device, dtype) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, ops, device, dtype)
        if operations is None and device != "meta" and not (isinstance(device, torch.device) and device.type == "meta"):
            self.initialize_weights()

    # ------------------------------------------------------------------ initialisation (spec §7)
    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """From-scratch init: PixArt's rules for the backbone plus §7.3 for the new modules."""
        def xavier(weight):
            flat = weight.view(weight.shape[0], -1)
            bound = math.sqrt(6.0 / (flat.shape[0] + flat.shape[1]))
            flat.uniform_(-bound, bound, generator=generator)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                xavier(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        d = self.config.hidden_size
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2, self.clip_embedder.proj.fc1):
            linear.weight.normal_(0.0, 0.02, generator=generator)
        for table in [b.scale_shift_table for b in self.blocks] + [self.final_layer.scale_shift_table]:
            table.copy_(torch.randn(table.shape, generator=generator) / math.sqrt(d))
        self.y_embedder.y_embedding.copy_(
            torch.randn(self.y_embedder.y_embedding.shape, generator=generator) / math.sqrt(self.config.caption_channels))
        self.clip_embedder.null_embedding.copy_(
            torch.randn(self.clip_embedder.null_embedding.shape, generator=generator) / math.sqrt(self.config.clip_channels))
        self.content_embedder.null_latent.zero_()
        zero = [self.final_layer.linear, self.clip_embedder.proj.fc2, self.content_embedder.fc]
        zero += [b.cross_attn.proj for b in self.blocks]
        for linear in zero:
            linear.weight.zero_()
            linear.bias.zero_()

    # ------------------------------------------------------------------ attention seam
    def attention(self, q, k, v, mask, *, layer: int, kind: str, attention_fn: AttentionFn | None,
                  options: dict) -> torch.Tensor:
        """Every attention call of the network. ``kind`` is "self" or "cross"; ``mask`` is additive."""
        if kind == "self" and attention_fn is not None:
            return attention_fn(q, k, v, self.config.num_heads, layer=layer, options=options)
        return sdpa(q, k, v, self.config.num_heads, mask)

    def run_block(self, index: int, x, t0, context: Context, attend, options: dict) -> torch.Tensor:
        """One transformer block (the ComfyUI subclass routes this through ``patches_replace``)."""
        return self.blocks[index](x, t0, context.for_block(index), context.mask, attend)

    # ------------------------------------------------------------------ helpers
    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        t, h, w = x.shape[-3:]
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size (T'={t}, h={h}, w={w}) is not divisible by patch_size {self.config.patch_size}")
        return t // pt, h // ph, w // pw

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, N, pt*ph*pw*C]`` laid out (pt, ph, pw, c), c fastest -> ``[B, C, T', h, w]``."""
        pt, ph, pw = self.config.patch_size
        gt, gh, gw = grid
        c = self.config.out_channels
        x = tokens.reshape(tokens.shape[0], gt, gh, gw, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(tokens.shape[0], c, gt * pt, gh * ph, gw * pw)

    def build_context(self, batch, text, text_mask, clip, content, latent_hw, drop, dtype, device) -> Context:
        cfg = self.config
        factor = cfg.vae_spatial_factor // CONTENT_VAE_FACTOR
        content_size = (latent_hw[0] * factor, latent_hw[1] * factor)
        return build_context(cfg, self.y_embedder, self.clip_embedder, self.content_embedder, batch=batch, text=text,
                             text_mask=text_mask, clip=clip, content=content, content_size=content_size, drop=drop,
                             dtype=dtype, device=device)

    def sample_drop_flags(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training-time condition dropout (spec §5.4): 'all' first, else each source independently."""
        rates = self.config.cfg_dropout
        drop_all = torch.rand(batch, generator=generator) < rates.get("all", 0.0)
        return {name: drop_all | (torch.rand(batch, generator=generator) < rates.get(name, 0.0))
                for name in ("text", "clip", "content")}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                clip: torch.Tensor | None = None, content: torch.Tensor | None = None, *,
                drop_text: torch.Tensor | None = None, drop_clip: torch.Tensor | None = None,
                drop_content: torch.Tensor | None = None, attention_fn: AttentionFn | None = None,
                options: dict | None = None) -> torch.Tensor:
        """Predict ``[B, 2*C, T', h, w]`` (eps in channels 0..C-1, the variance value v after them).

        x: noisy motion latent ``[B, C, T', h, w]``; t: DDPM timesteps ``[B]`` in [0, 999];
        text: T5 tokens ``[B, L, caption_channels]`` (+ ``text_mask`` ``[B, L]``, 1 = real token);
        clip: ``[B, clip_tokens, clip_channels]`` or None (null); content: raw SD-VAE latent
        ``[B, 4, H/8, W/8]`` or None (null). ``drop_*``: bool ``[B]``, true = use that source's null.
        ``options`` is handed to ``attention_fn`` with ``token_grid`` filled in.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be a motion latent [B, {cfg.in_channels}, T', h, w], got {list(x.shape)}")
        batch = x.shape[0]
        grid = self.token_grid(x)
        options = dict(options) if options is not None else {}
        options["token_grid"] = grid
        device = x.device

        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)           # [B, N, D], raster (t, h, w)
        pos = sincos_3d(*grid, cfg.hidden_size, cfg.pe_base_size, cfg.pe_interpolation, cfg.temporal_pe == "sincos")
        tokens = tokens + pos.to(device=device, dtype=tokens.dtype)

        t = t.to(device).reshape(-1).expand(batch) if t.numel() == 1 else t.to(device).reshape(batch)
        t_emb = self.t_embedder(t, tokens.dtype)
        t0 = self.t_block(t_emb).reshape(batch, 6, cfg.hidden_size)

        drop = {"text": drop_text, "clip": drop_clip, "content": drop_content}
        context = self.build_context(batch, text, text_mask, clip, content, x.shape[-2:], drop, tokens.dtype, device)

        for index in range(cfg.depth):
            def attend(q, k, v, mask, kind, _layer=index):
                return self.attention(q, k, v, mask, layer=_layer, kind=kind, attention_fn=attention_fn, options=options)
            tokens = self.run_block(index, tokens, t0, context, attend, options)

        out = self.final_layer(tokens, t_emb)
        return self.unpatchify(out, grid)
