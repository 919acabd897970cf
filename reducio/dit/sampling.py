"""Sampling maths for Reducio-DiT (spec §5): the DDPM linear-beta schedule in the sigma (VE) view,
the uniform-in-timestep ("normal") step schedule, DPM-Solver++ 2M, and latent re-normalisation.

Conventions match ComfyUI's discrete EPS sampling, so the stand-alone pipeline and a KSampler run with
``dpmpp_2m`` / ``normal`` follow the same trajectory: x_sigma = x0 + sigma * eps, the network sees
x_sigma / sqrt(1 + sigma^2) and the nearest integer training timestep of sigma.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def training_sigmas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) for betas linspace(beta_start, beta_end) (float32)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def sigma_to_timestep(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The training timestep whose sigma is nearest in log space (an integer-valued float tensor)."""
    dists = sigma.float().log().reshape(-1, 1) - sigmas.log().reshape(1, -1)
    return dists.abs().argmin(dim=1).float().reshape(sigma.shape)


def timestep_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Log-linear interpolation of the training sigmas at fractional timesteps."""
    t = t.float().clamp(0, len(sigmas) - 1)
    low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = sigmas.log()
    return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp()


def normal_schedule(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps + 1`` sigmas: timesteps uniform from the last training step down to 0, then sigma 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = sigma_to_timestep(sigmas[-1:], sigmas)[0]
    end = sigma_to_timestep(sigmas[:1], sigmas)[0]
    timesteps = torch.linspace(float(start), float(end), steps)
    return torch.cat([timestep_to_sigma(timesteps, sigmas), torch.zeros(1)])


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]   # (x, sigma, step index) -> x0


@torch.no_grad()
def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, schedule: torch.Tensor,
             callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DPM-Solver++ (2M), data prediction, in log-sigma time lambda = -log(sigma).

    First step and the step to sigma 0 are first order; the others extrapolate the data prediction
    linearly from the previous step: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
    """
    previous = None
    for i in range(len(schedule) - 1):
        sigma, sigma_next = schedule[i], schedule[i + 1]
        x0 = denoise(x, sigma, i)
        if callback is not None:
            callback(i, x0)
        if sigma_next == 0:
            x = x0
        else:
            lam, lam_next = -sigma.log(), -sigma_next.log()
            h = lam_next - lam
            estimate = x0
            if previous is not None:
                r = (lam - (-schedule[i - 1].log())) / h
                estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        previous = x0
    return x


def renormalize_latent(latent: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample layer norm over (C, T', h, w), no affine: the statistics the VAE decoder expects."""
    return F.layer_norm(latent.float(), latent.shape[1:], eps=eps).to(latent.dtype)
