"""The PixArt / IDDPM training objective of Reducio-DiT (spec reducio_dit.md §5.1).

eps-prediction with learned sigma ("learned range"): loss = MSE(eps, eps_hat) + the variational-bound
term for the variance with the predicted mean detached (IDDPM hybrid loss, not rescaled, as PixArt).
Linear beta schedule 1e-4 ... 0.02 over 1000 steps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps --
exactly what ComfyUI's discrete EPS sampling feeds the model (x_sigma / sqrt(1 + sigma^2), timestep t).

``high_noise_weight`` (ours; 1 = PixArt's plain eps MSE): the eps MSE of step t is weighted by
clamp(sigma_t^2, 1, high_noise_weight), sigma_t^2 = (1 - abar_t) / abar_t. An eps error at noise level
sigma is an x0 error of sigma times its size, so the plain eps MSE weighs what the model gets wrong about
the *clean* latent by 1 / sigma^2: almost nothing at the high noise levels where only the conditions can
say what the result should be. Measured on the tiny DiT (docs/embedded_models.md): with the plain
MSE it ignored its caption after 2 500 steps (the caption changed the eps MSE by < 2 %), because at
every noise level where the loss has weight the motion can be read off x_t itself.
"""
from __future__ import annotations

import math

import torch


class GaussianDiffusion:
    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 high_noise_weight: float = 1.0):
        if not high_noise_weight >= 1.0:
            raise ValueError(f"high_noise_weight must be >= 1 (1 = the plain eps MSE), got {high_noise_weight}")
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt(), (1 - abar).sqrt()
        self.sqrt_recip_abar, self.sqrt_recipm1_abar = (1 / abar).sqrt(), (1 / abar - 1).sqrt()
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        # log of the posterior variance, its t = 0 value (0) replaced by t = 1's (IDDPM's "clipped")
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_coef_xt = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        self.log_betas = betas.log()
        self.mse_weight = ((1 - abar) / abar).clamp(1.0, float(high_noise_weight))

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].float().reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_one_minus_abar, t, x0) * noise

    def training_losses(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``mse`` (unweighted), ``vb`` (bits per dim) and ``loss`` = weighted mse + vb from the
        model output ``[B, 2C, ...]`` (eps_hat, v)."""
        channels = x0.shape[1]
        eps_hat, v = output[:, :channels].float(), output[:, channels:].float()
        mse = (noise - eps_hat).pow(2).flatten(1).mean(1)
        weighted = mse * self.mse_weight.to(mse.device)[t].float()
        # variance: log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t, frac = (v + 1) / 2
        frac = (v + 1) / 2
        model_log_var = frac * self._at(self.log_betas, t, x0) + (1 - frac) * self._at(self.posterior_log_variance, t, x0)
        # mean from the detached eps (the vb term trains the variance only)
        x0_hat = self._at(self.sqrt_recip_abar, t, x0) * x_t - self._at(self.sqrt_recipm1_abar, t, x0) * eps_hat.detach()
        model_mean = self._at(self.posterior_coef_x0, t, x0) * x0_hat + self._at(self.posterior_coef_xt, t, x0) * x_t
        true_mean = self._at(self.posterior_coef_x0, t, x0) * x0 + self._at(self.posterior_coef_xt, t, x0) * x_t
        true_log_var = self._at(self.posterior_log_variance, t, x0)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
                    + (true_mean - model_mean).pow(2) * (-model_log_var).exp())
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": weighted + vb, "mse": mse, "vb": vb}


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """IDDPM's decoder likelihood of ``x`` on 256 bins over [-1, 1] (used at t = 0)."""
    centred = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
