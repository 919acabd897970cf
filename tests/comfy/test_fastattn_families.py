"""Tier 2: DiTFastAttn on every supported native family (tiny random models), and the no-ops.

For each family: an all-full plan is bit-identical to the unpatched model; a compressing plan
(AST + WA-RS) reaches every block's self-attention exactly once per model call (cross-attention
and text-refiner calls are left alone), keeps joint-attention text tokens global, and changes the
result while staying finite.
"""

import pytest
import torch

from testkit import fastattn_tiny as tiny
from testkit.fastattn_tiny import mixed_plan, spy_calls  # noqa: E402

pytestmark = pytest.mark.comfyui


FAMILIES = {
    # name: (builder, conditioning factory, latent, expected (prefix, suffix, grid), model calls per eval)
    "wan": (tiny.tiny_wan, lambda s: tiny.conditioning(7, seed=s), tiny.video_latent(), (0, 0, (3, 4, 4)), 1),
    "flux": (tiny.tiny_flux, lambda s: tiny.conditioning(6, seed=s, pooled=8), tiny.image_latent(), (6, 0, (4, 4)), 1),
    "sd3": (tiny.tiny_sd3, lambda s: tiny.conditioning(6, seed=s, pooled=8), tiny.image_latent(), (6, 0, (4, 4)), 1),
    "hunyuan_video": (tiny.tiny_hunyuan_video, lambda s: tiny.conditioning(6, seed=s, pooled=8),
                      tiny.video_latent(), (0, 6, (3, 4, 4)), 1),
    # PixArt is reached through per-block object patches, not the override (spec 15.2)
    "pixart": (tiny.tiny_pixart, lambda s: tiny.conditioning(6, seed=s), tiny.image_latent(channels=4, size=48),
               (0, 0, (24, 24)), 1),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(fa, monkeypatch, name):
    build, cond, latent, expected_layout, model_calls = FAMILIES[name]
    model = build(seed=0)
    family = fa.families.detect_family(model)
    assert family.name == name
    pos, neg = cond(1), cond(2)
    ref = fa.sample(model, pos, neg, latent)
    assert torch.equal(fa.sample(fa.apply(model, fa.full_plan(model, 4)), pos, neg, latent), ref)

    seen = spy_calls(fa, monkeypatch)
    patched = fa.apply(model, mixed_plan(fa, model))
    out = fa.sample(patched, pos, neg, latent)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    layers = family.layer_names(model.model.diffusion_model)
    # each layer's self-attention once per model call, nothing else (no cross / refiner calls)
    assert sorted(s[0] for s in seen) == sorted(layers * 4 * model_calls)
    assert {s[1:] for s in seen} == {expected_layout}


def test_cosmos_predict2_counts_calls_per_block(fa, monkeypatch):
    model = tiny.tiny_cosmos_predict2(seed=0)
    assert fa.families.detect_family(model).name == "cosmos_predict2"
    cond = tiny.lotus_conditioning()
    neg = [[torch.zeros_like(cond[0][0]), {}]]
    latent = tiny.video_latent(frames=2)
    ref = fa.sample(model, cond, neg, latent, steps=2)
    assert torch.equal(fa.sample(fa.apply(model, fa.full_plan(model, 2)), cond, neg, latent, steps=2), ref)
    seen = spy_calls(fa, monkeypatch)
    out = fa.sample(fa.apply(model, mixed_plan(fa, model, steps=2)), cond, neg, latent, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    # cond and uncond batched: one model call per evaluation; 10 blocks, self-attention only
    assert sorted(s[0] for s in seen) == sorted([f"block.{i}" for i in range(10)] * 2)
    assert {s[1:] for s in seen} == {(0, 0, (2, 4, 4))}


def test_reducio_dit_through_the_native_loader(fa, comfy, monkeypatch):
    from reducio.dit import ReducioDiT, get_config, save_checkpoint

    torch.manual_seed(0)
    dit = ReducioDiT(get_config("tiny")).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    folder = comfy.models_folder("reducio")
    save_checkpoint(dit, folder / "fastattn_tiny_reducio_dit.safetensors")
    (model,) = comfy.execute("ReducioDiTLoader", dit_name="fastattn_tiny_reducio_dit.safetensors", weight_dtype="fp32")
    assert fa.families.detect_family(model).name == "reducio_dit"
    g = torch.Generator().manual_seed(3)
    extra = {"reducio_clip_tokens": torch.randn(1, 4, 32, generator=g),
             "reducio_content_latent": torch.randn(1, 4, 32, 32, generator=g)}
    pos = [[torch.randn(1, 5, 32, generator=g), {**extra, "reducio_drop": torch.zeros(1, 3)}]]
    neg = [[torch.randn(1, 3, 32, generator=g), {**extra, "reducio_drop": torch.tensor([[1.0, 0.0, 0.0]])}]]
    latent = {"samples": torch.zeros(1, 16, 4, 8, 8)}
    settings = dict(steps=3, cfg=4.5, sampler="dpmpp_2m", scheduler="normal")
    ref = fa.sample(model, pos, neg, latent, **settings)
    assert torch.equal(fa.sample(fa.apply(model, fa.full_plan(model, 3)), pos, neg, latent, **settings), ref)
    seen = spy_calls(fa, monkeypatch)
    plan, calib_out, _ = fa.calibrate(model, pos, neg, latent, threshold=0.1, **settings)
    out = fa.sample(fa.apply(model, plan), pos, neg, latent, **settings)
    assert torch.equal(out, calib_out)
    assert seen, "the override never reached Reducio-DiT's self-attention"
    assert plan.metadata.architecture == "reducio_dit"


def test_pixart_is_patched_through_object_patches_not_a_no_op(fa):
    model = tiny.tiny_pixart()
    family = fa.families.detect_family(model)
    assert family.name == "pixart" and family.access is fa.families.OBJECT_PATCH
    patched = fa.apply(model, fa.full_plan(model, 4))
    assert fa.patcher.installed_spec(patched) is not None
    assert sorted(k for k in patched.object_patches if k.endswith(".attn.forward")) == \
        [f"diffusion_model.blocks.{i}.attn.forward" for i in range(2)]
    assert not model.object_patches, "the input model must not get object patches"
