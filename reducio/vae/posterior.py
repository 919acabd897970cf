"""Diagonal Gaussian posterior over the motion latent, and the latent normalisation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LATENT_NORM_EPS = 1e-5


class DiagonalGaussian:
    """Posterior built from moments [B, 2*C, T', h, w]: first half mean, second half log-variance.

    The log-variance is clamped to [-30, 20] as in the official code.
    """

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps, eps drawn in float32 on the CPU (default generator unless one is given).

        Drawing on the CPU is what the official code does, so ``torch.manual_seed(s)`` (or a CPU
        ``torch.Generator`` seeded with s) reproduces the official sample on any device.
        """
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator: the official sampling draws its noise on the CPU")
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I) per sample: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


def normalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Per-sample layer norm over (C, T, H, W), eps 1e-5, no affine, computed in float32.

    This is the latent the decoder (and the DiT) expects; there is no scale factor or shift.
    """
    return F.layer_norm(z.float(), z.shape[1:], eps=LATENT_NORM_EPS)
