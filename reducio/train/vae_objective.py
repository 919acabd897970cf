"""The official Reducio-VAE objective (spec reducio_vae.md §8): L1 reconstruction (+ perceptual),
KL 1e-6, a one-sided outlier penalty, and a hinge GAN with a 3-D PatchGAN discriminator switched on
at ``disc_start`` with the adaptive weight ||grad nll|| / ||grad g|| on the decoder's last conv.

Ours, off by default: the *motion hint* (``motion_hint_weight``) for decoders with warp levels, see
:func:`motion_hint_targets`."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..vae.motion import frame_shifts
from .perceptual import per_frame


@dataclass
class VAELossConfig:
    rec_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.1     # only used when a perceptual network is given
    penalty_weight: float = 1.0
    penalty_radius: float = 3.0
    disc_start: int = 10001
    disc_weight: float = 0.05
    disc_factor: float = 1.0
    adaptive_gan: bool = True
    motion_hint_weight: float = 0.0    # ours; 0 = the official objective

    def to_dict(self) -> dict:
        return asdict(self)


class PatchDiscriminator3D(nn.Module):
    """The official 3-D PatchGAN (keys ``main.{0,2,3,5,6,8,9,11}``); ``ndf`` 64 = 4,216,641 parameters.

    ``norm`` "batch" (official: BatchNorm3d, statistics per process under DDP) or "group" (GroupNorm,
    identical results for any number of processes)."""

    def __init__(self, ndf: int = 64, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {norm!r}")

        def make_norm(ch):
            return nn.BatchNorm3d(ch) if norm == "batch" else nn.GroupNorm(min(32, ch // 2) or 1, ch)

        act = lambda: nn.LeakyReLU(0.2, inplace=False)  # noqa: E731
        self.main = nn.Sequential(
            nn.Conv3d(3, ndf, 4, 2, 1), act(),
            nn.Conv3d(ndf, ndf * 2, 4, 2, 1, bias=False), make_norm(ndf * 2), act(),
            nn.Conv3d(ndf * 2, ndf * 4, (3, 4, 4), 2, 1, bias=False), make_norm(ndf * 4), act(),
            nn.Conv3d(ndf * 4, ndf * 8, (1, 4, 4), 1, (0, 1, 1), bias=False), make_norm(ndf * 8), act(),
            nn.Conv3d(ndf * 8, 1, (1, 4, 4), 1, (0, 1, 1)),
        )

    def initialize(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv3d):
                    module.weight.normal_(0.0, 0.02, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, (nn.BatchNorm3d, nn.GroupNorm)):
                    module.weight.normal_(1.0, 0.02, generator=generator)
                    module.bias.zero_()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.main(video)


class DiscriminatorPair(nn.Module):
    """One forward for (real, fake), so a DDP wrapper sees a single call per step (two separate
    passes, as the official code makes them: BatchNorm statistics are not mixed)."""

    def __init__(self, discriminator: PatchDiscriminator3D):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.discriminator(real), self.discriminator(fake)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-sample KL to N(0, I): 0.5 * sum(mean^2 + var - 1 - logvar)."""
    per_sample = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return per_sample.mean()


def outlier_penalty(recon: torch.Tensor, radius: float) -> torch.Tensor:
    """mean(relu(x - mean_HW(x) - radius * std_HW(x))) per frame and channel (one-sided, unbiased std)."""
    mean = recon.mean(dim=(-2, -1), keepdim=True)
    std = recon.std(dim=(-2, -1), keepdim=True)
    return F.relu(recon - mean - radius * std).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, reduce_mean) -> torch.Tensor:
    """||grad nll|| / (||grad g|| + 1e-4) on ``last_layer``, clamped to [0, 1e4], detached.

    ``reduce_mean`` averages the two gradients over processes first, so the weight is that of the
    global batch whatever the number of processes."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    nll_grad, g_grad = reduce_mean(nll_grad), reduce_mean(g_grad)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def generator_loss(video, recon, mean, logvar, cfg: VAELossConfig, perceptual=None):
    """Terms without the GAN part: (nll, kl, penalty, perceptual-mean) -- nll includes the perceptual term."""
    rec = (video - recon).abs()
    p_mean = torch.zeros((), device=video.device)
    if perceptual is not None and cfg.perceptual_weight > 0:
        p = per_frame(perceptual, video.contiguous(), recon.contiguous()) * cfg.perceptual_weight
        rec = rec + p
        p_mean = p.mean()
    nll = rec.mean() * cfg.rec_weight
    return nll, kl_loss(mean, logvar), outlier_penalty(recon, cfg.penalty_radius), p_mean


@torch.no_grad()
def motion_hint_targets(video: torch.Tensor, content_index: int) -> torch.Tensor:
    """Per frame, the global shift that moves the content frame onto that frame: ``[B, 2, T]`` (dx, dy)
    in pixels, from phase correlation of the clip's own frames (no labels: any video has it).

    Why: a warp decoder (``WarpFusion`` / ``LatentFlow``) reconstructs a clip far better with the right
    flow -- measured on a held-out pan clip, a free global flow per latent frame fitted by gradient
    descent took the L1 error from 0.132 to 0.048 -- but trained on reconstruction alone its encoder
    never starts to put the motion into the latent: the flow layer's gradient averages to nothing
    while the latent holds no motion, and the latent gets no reason to hold motion while the flow
    ignores it (300 + 150 steps, flows under 0.2 pixel and unrelated to the clip). This target pulls
    the latent flow's spatial mean towards the clip's dominant motion and breaks that standstill;
    everything finer (sprites, zoom, roll) is left to the reconstruction loss.
    """
    return frame_shifts(video, content_index).float()


def motion_hint_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 in pixels between the latent flow's spatial mean ``[B, 2, T]`` and :func:`motion_hint_targets`."""
    return (predicted.float() - target.float()).abs().mean()
