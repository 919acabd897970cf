"""Stand-alone image -> video sampling with Reducio-DiT and Reducio-VAE (spec reducio_dit.md §2, §5).

The caller supplies the condition tensors (T5 tokens, OpenCLIP patch tokens, the raw SD-VAE latent of the
content image) and the content image in pixels; this module samples the motion latent with DPM-Solver++
2M on the linear-beta schedule with classifier-free guidance, re-normalises it and decodes it with a
Reducio VAE (anything with ``decode(latent, content) -> video``).

``attention_fn(q, k, v, heads, *, layer, options) -> out`` replaces every self-attention of the DiT;
``options`` carries ``step`` (denoiser evaluation index), ``cond_or_uncond`` (one id per batch chunk,
0 = cond, 1 = uncond, ComfyUI's convention: uncond first when batched) and ``token_grid`` (T', h, w).
This is how a DiTFastAttn plan applies here; this package never imports ``fastattn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .dit.model import AttentionFn, ReducioDiT
from .dit.sampling import dpmpp_2m, normal_schedule, renormalize_latent, sigma_to_timestep, training_sigmas

CFG_MODES = ("text", "all")


@dataclass
class Conditions:
    """Conditions of one prompt + content image (batch 1 or B). ``content_latent`` is the RAW SD-VAE latent."""
    text: torch.Tensor                       # [B, L, caption_channels]
    text_mask: torch.Tensor | None           # [B, L], 1 = real token
    clip: torch.Tensor | None                # [B, clip_tokens, clip_channels]
    content_latent: torch.Tensor | None      # [B, 4, H/8, W/8]


def _rows(t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if t is None or t.shape[0] == batch:
        return t
    if t.shape[0] != 1:
        raise ValueError(f"condition batch {t.shape[0]} does not match the sample batch {batch}")
    return t.expand(batch, *t.shape[1:])


@torch.no_grad()
def sample_motion_latent(model: ReducioDiT, cond: Conditions, *, height: int, width: int, batch: int = 1,
                         negative: Conditions | None = None, steps: int | None = None, cfg: float | None = None,
                         cfg_mode: str | None = None, seed: int = 0, latent_frames: int | None = None,
                         noise: torch.Tensor | None = None, attention_fn: AttentionFn | None = None,
                         callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample ``[batch, C, T', H/f, W/f]`` with DPM-Solver++ 2M and CFG (defaults from the model config).

    The uncond branch uses the learned null text (all-ones mask), or the ``negative`` text when given;
    with ``cfg_mode`` "all" it also uses the CLIP and content nulls. ``cfg`` 1 skips the uncond branch.
    """
    mcfg = model.config
    defaults = mcfg.inference
    steps = int(defaults["steps"] if steps is None else steps)
    cfg = float(defaults["cfg"] if cfg is None else cfg)
    cfg_mode = defaults["cfg_mode"] if cfg_mode is None else cfg_mode
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
    factor = mcfg.vae_spatial_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    frames = int(latent_frames or mcfg.latent_frames)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shape = (batch, mcfg.in_channels, frames, height // factor, width // factor)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")

    sigmas = training_sigmas(mcfg.num_train_timesteps, mcfg.beta_start, mcfg.beta_end)
    schedule = normal_schedule(sigmas, steps)
    use_cfg = cfg != 1.0

    def rows(t):
        return None if t is None else _rows(t, batch).to(device)

    text, mask, clip, content = rows(cond.text), rows(cond.text_mask), rows(cond.clip), rows(cond.content_latent)
    if mask is None:
        mask = torch.ones(text.shape[:2], device=device)
    zeros = torch.zeros(batch, dtype=torch.bool, device=device)
    ones = torch.ones(batch, dtype=torch.bool, device=device)
    if use_cfg:
        if negative is not None:
            n_text, n_mask = rows(negative.text), rows(negative.text_mask)
            n_mask = torch.ones(n_text.shape[:2], device=device) if n_mask is None else n_mask
            drop_text_uncond = zeros
        else:
            n_text, n_mask, drop_text_uncond = text, mask, ones
        n_text, n_mask = model.y_embedder.fit_length(n_text, n_mask)
        text, mask = model.y_embedder.fit_length(text, mask)
        drop_image_uncond = ones if cfg_mode == "all" else zeros
        # one batched call per step: uncond rows first, as ComfyUI batches them
        inputs = dict(text=torch.cat([n_text, text]), text_mask=torch.cat([n_mask, mask]),
                      clip=None if clip is None else torch.cat([clip, clip]),
                      content=None if content is None else torch.cat([content, content]),
                      drop_text=torch.cat([drop_text_uncond, zeros]),
                      drop_clip=torch.cat([drop_image_uncond, zeros]),
                      drop_content=torch.cat([drop_image_uncond, zeros]))
        cond_or_uncond = [1, 0]
    else:
        inputs = dict(text=text, text_mask=mask, clip=clip, content=content)
        cond_or_uncond = [0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        scaled = (x / (sigma ** 2 + 1).sqrt()).to(device=device, dtype=dtype)
        t = sigma_to_timestep(sigma.reshape(1), sigmas).to(device)
        if use_cfg:
            scaled = torch.cat([scaled, scaled])
        options = {"step": step, "cond_or_uncond": list(cond_or_uncond), "sigma": float(sigma)}
        eps = model(scaled, t, attention_fn=attention_fn, options=options, **inputs)[:, : mcfg.in_channels]
        eps = eps.float().cpu()
        if use_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        return x - sigma * eps

    x = noise.float() * (1.0 + schedule[0] ** 2).sqrt()   # full denoise starts from N(0, 1 + sigma_max^2)
    return dpmpp_2m(denoise, x, schedule, callback)


@torch.no_grad()
def generate_video(model: ReducioDiT, vae, cond: Conditions, content_image: torch.Tensor, *,
                   renormalize: bool | None = None, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a motion latent and decode it with ``vae.decode(latent, content_image)``.

    ``content_image``: ``[B or 1, 3, H, W]`` in [-1, 1], the SAME image whose CLIP tokens and SD-VAE latent
    are in ``cond``; it becomes frame 7 (the 8th of 16). Returns (video from the VAE, motion latent).
    """
    if content_image.ndim != 4 or content_image.shape[1] != 3:
        raise ValueError(f"content_image must be [B, 3, H, W] in [-1, 1], got {list(content_image.shape)}")
    height, width = content_image.shape[-2:]
    latent = sample_motion_latent(model, cond, height=height, width=width, **sampling)
    if model.config.inference.get("renormalize_latent", True) if renormalize is None else renormalize:
        latent = renormalize_latent(latent)
    content = _rows(content_image, latent.shape[0])
    return vae.decode(latent, content), latent
