"""Stand-alone sampling: schedule, DPM-Solver++ 2M, CFG batching, the attention hook, and the full
text+image -> video pipeline on a tiny Reducio-DiT with the golden tiny Reducio VAE (pure PyTorch)."""
import json
import math

import pytest
import torch

from reducio import ReducioVAE
from reducio.dit import ReducioDiT, get_config
from reducio.dit.sampling import dpmpp_2m, normal_schedule, renormalize_latent, sigma_to_timestep, training_sigmas
from reducio.pipeline import Conditions, generate_video, sample_motion_latent


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # widths of the golden tiny Reducio VAE: 8 latent channels, 8 px per latent cell
    model = ReducioDiT(get_config("tiny", in_channels=8, vae_spatial_factor=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def conditions(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return Conditions(text=torch.randn(1, 5, 32, generator=g), text_mask=None,
                      clip=torch.randn(1, 4, 32, generator=g),
                      content_latent=torch.randn(1, 4, size // 8, size // 8, generator=g))


# ------------------------------------------------------------------------------------ schedule
def test_linear_schedule_and_normal_steps():
    sigmas = training_sigmas()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(sigmas[[0, 500, 999]].double(), ((1 - abar) / abar).sqrt()[[0, 500, 999]], rtol=1e-5)
    sched = normal_schedule(sigmas, 20)
    assert len(sched) == 21 and sched[-1] == 0
    assert torch.isclose(sched[0], sigmas[-1]) and torch.isclose(sched[-2], sigmas[0], rtol=1e-5)
    assert bool((sched[:-1][1:] < sched[:-1][:-1]).all())
    # the 10th step sits at timestep 999 * (1 - 10/19), interpolated in log-sigma
    assert sigma_to_timestep(sched[10:11], sigmas).item() == round(999 * (1 - 10 / 19))


def test_dpmpp_2m_is_exact_for_a_point_mass_and_accurate_for_a_gaussian():
    sched = normal_schedule(training_sigmas(), 20)
    target = torch.full((4,), 0.3)
    out = dpmpp_2m(lambda x, s, i: target.clone(), torch.randn(4) * float(sched[0]), sched)
    assert torch.allclose(out, target)
    # data ~ N(0, s^2): the exact denoiser is x s^2 / (s^2 + sigma^2) and the probability-flow ODE maps
    # N(0, s^2 + sigma_max^2) to N(0, s^2); the solver's error must shrink with the step count
    s = 0.5
    errors = []
    for steps in (10, 20, 50, 200):
        sched = normal_schedule(training_sigmas(), steps).double()
        x = torch.randn(50_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = x * math.sqrt(s ** 2 + float(sched[0]) ** 2)
        out = dpmpp_2m(lambda x, sig, i: x * s ** 2 / (s ** 2 + sig ** 2), x, sched)
        errors.append(abs(out.std().item() - s))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 * s


def test_renormalize_latent():
    z = torch.randn(3, 8, 4, 6, 6) * 4 + 2
    out = renormalize_latent(z)
    flat = out.reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.var(1, unbiased=False), torch.ones(3), atol=1e-3)


# ------------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_and_batches_cond_with_uncond(tiny):
    seen = []

    def hook(q, k, v, heads, *, layer, options):
        seen.append((options["step"], layer, tuple(options["cond_or_uncond"]), q.shape[0], options["token_grid"]))
        b, n, c = q.shape
        qh, kh, vh = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, c)

    a = sample_motion_latent(tiny, conditions(), height=64, width=64, steps=3, seed=1, attention_fn=hook)
    assert a.shape == (1, 8, 4, 8, 8) and torch.isfinite(a).all()
    assert [(s[0], s[1]) for s in seen] == [(step, layer) for step in range(3) for layer in range(4)]
    assert all(s[2] == (1, 0) and s[3] == 2 and s[4] == (4, 8, 8) for s in seen)
    b = sample_motion_latent(tiny, conditions(), height=64, width=64, steps=3, seed=1)
    assert torch.allclose(a, b, atol=1e-5)          # the hook reproduces SDPA; the seed fixes the noise
    c = sample_motion_latent(tiny, conditions(), height=64, width=64, steps=3, seed=2)
    assert not torch.allclose(a, c)


def test_cfg_one_runs_only_the_conditional_branch(tiny):
    seen = []

    def hook(q, k, v, heads, *, layer, options):
        seen.append(tuple(options["cond_or_uncond"]))
        return torch.zeros_like(q)

    sample_motion_latent(tiny, conditions(), height=64, width=64, steps=2, cfg=1.0, attention_fn=hook)
    assert set(seen) == {(0,)}


def test_guidance_modes_and_negative_prompt_change_the_result(tiny):
    base = dict(height=64, width=64, steps=2, seed=0)
    text_only = sample_motion_latent(tiny, conditions(), **base)
    all_null = sample_motion_latent(tiny, conditions(), cfg_mode="all", **base)
    negative = sample_motion_latent(tiny, conditions(), negative=conditions(seed=9), **base)
    assert not torch.allclose(text_only, all_null) and not torch.allclose(text_only, negative)
    with pytest.raises(ValueError, match="cfg_mode"):
        sample_motion_latent(tiny, conditions(), cfg_mode="image", **base)
    with pytest.raises(ValueError, match="multiples of 8"):
        sample_motion_latent(tiny, conditions(), height=60, width=64, steps=1)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_motion_latent(tiny, conditions(), height=64, width=64, steps=1, noise=torch.randn(1, 8, 4, 4, 4))


def test_defaults_come_from_the_model_config(tiny):
    calls = []
    orig = tiny.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return orig(*args, **kwargs)

    tiny.forward = counting
    try:
        sample_motion_latent(tiny, conditions(), height=64, width=64)
    finally:
        del tiny.forward
    assert calls == [2] * tiny.config.inference["steps"]   # 20 steps, cond + uncond batched


# ------------------------------------------------------------------------------------ full pipeline
def test_generate_video_with_the_golden_tiny_reducio_vae(tiny, golden_dir):
    from safetensors.torch import load_file

    base = golden_dir / "reducio"
    config = json.loads((base / "tiny_config.json").read_text())["constructor_kwargs"]
    config.pop("lossconfig", None)
    vae = ReducioVAE(**config).eval()
    vae.load_state_dict(load_file(str(base / "tiny_weights.safetensors")), strict=True)
    content = torch.rand(1, 3, 64, 64) * 2 - 1
    video, latent = generate_video(tiny, vae, conditions(), content, steps=2, seed=4)
    assert latent.shape == (1, 8, 4, 8, 8)
    flat = latent.reshape(1, -1)
    assert abs(flat.mean().item()) < 1e-4 and abs(flat.std(unbiased=False).item() - 1) < 1e-3   # re-normalised
    assert video.shape == (1, 3, 16, 64, 64) and torch.isfinite(video).all()
    # the decode really uses the content image
    other, _ = generate_video(tiny, vae, conditions(), -content, steps=2, seed=4)
    assert not torch.allclose(video, other)
    with pytest.raises(ValueError, match=r"content_image must be \[B, 3, H, W\]"):
        generate_video(tiny, vae, conditions(), torch.rand(1, 64, 64, 3), steps=1)
