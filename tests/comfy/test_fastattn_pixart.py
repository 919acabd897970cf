"""Tier 2: DiTFastAttn on ComfyUI's native PixArt (Sigma config, tiny, random weights).

PixArt's self-attention never receives transformer_options, so the pack reaches it through one
``ModelPatcher.add_object_patch("diffusion_model.blocks.{i}.attn.forward", ...)`` per block.
Checked with real ComfyUI sampling: all-full plan == unpatched bit for bit, a calibrated plan
reproduces its calibration run, the input model keeps no object patch, cfg 1 and cfg > 1,
non-standard blocks are left alone.
"""
import sys

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui

POS, NEG = tiny.conditioning(6, seed=1), tiny.conditioning(5, seed=2)


def latent():
    return tiny.image_latent(channels=4, size=48)      # 24x24 patch grid (32x32 gives base_size 0)


@pytest.fixture(scope="module")
def pixart():
    return tiny.tiny_pixart(seed=0)


def spy_calls(fa, monkeypatch):
    run_state = sys.modules[fa.patcher.RunState.__module__]
    seen = []
    original = run_state.RunState.attend

    def spy(self, **kw):
        seen.append((kw["layer"], kw["token_grid"], kw["cond_or_uncond"], kw["q"].shape))
        return original(self, **kw)

    monkeypatch.setattr(run_state.RunState, "attend", spy)
    return seen


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_all_full_plan_is_bit_identical_to_unpatched(fa, pixart, monkeypatch, cfg):
    ref = fa.sample(pixart, POS, NEG, latent(), cfg=cfg)
    seen = spy_calls(fa, monkeypatch)
    out = fa.sample(fa.apply(pixart, fa.full_plan(pixart, 4)), POS, NEG, latent(), cfg=cfg)
    assert torch.equal(out, ref)
    # each block's self-attention reached once per model call, on the 24x24 grid, no cross-attention.
    # The two conditionings differ in length, so ComfyUI runs cond and uncond as separate calls:
    # cond_or_uncond (for CFG sharing) comes from the APPLY_MODEL wrapper's transformer_options.
    model_calls = 2 if cfg > 1 else 1
    assert sorted(s[0] for s in seen) == sorted(["block.0", "block.1"] * 4 * model_calls)
    assert {s[1] for s in seen} == {(24, 24)}
    assert {tuple(s[3]) for s in seen} == {(1, 4, 576, 16)}
    assert {tuple(s[2]) for s in seen} == ({(0,), (1,)} if cfg > 1 else {(0,)})


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_calibrated_plan_reproduces_calibration_and_leaves_input_untouched(fa, pixart, cfg):
    plan, calib_out, _ = fa.calibrate(pixart, POS, NEG, latent(), cfg=cfg, threshold=0.2)
    assert plan.metadata.architecture == "pixart"
    assert set(plan.methods[0]) == {"full_attn"}
    counts = plan.method_counts()
    assert sum(n for m, n in counts.items() if m != "full_attn") > 0, f"nothing compressed: {counts}"
    if cfg == 1.0:
        assert not any("cfg" in m for m in counts), counts   # no CFG pair to share across

    patched = fa.apply(pixart, plan)
    assert all(k in patched.object_patches for k in
               ("diffusion_model.blocks.0.attn.forward", "diffusion_model.blocks.1.attn.forward"))
    out = fa.sample(patched, POS, NEG, latent(), cfg=cfg)
    assert torch.equal(out, calib_out)
    ref = fa.sample(pixart, POS, NEG, latent(), cfg=cfg)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    report = fa.patcher.installed_spec(patched).sink.last
    assert report.compressible_calls == 4 * 2 * (2 if cfg > 1 else 1) and report.flops_kept < 1.0

    # the input model: no object patch, no override; after it sampled last (ComfyUI unloads the
    # patched clone first, restoring its object patches) the shared modules run the stock forward
    assert not pixart.object_patches
    assert "optimized_attention_override" not in pixart.model_options.get("transformer_options", {})
    for block in pixart.model.diffusion_model.blocks:
        # ComfyUI's unpatch puts the original bound method back as an instance attribute
        forward = block.attn.forward
        assert getattr(forward, "__func__", None) is type(block.attn).forward, \
            "an object patch was left on the shared model"
        assert not hasattr(forward, fa.patcher.pixart_patch.PATCH_MARK)


def test_remove_patch_drops_the_object_patches(fa, pixart):
    patched = fa.apply(pixart, fa.full_plan(pixart, 4))
    removed = fa.patcher.remove_patch(patched)
    assert not [k for k in removed.object_patches if k.endswith(".attn.forward")]
    assert [k for k in patched.object_patches if k.endswith(".attn.forward")], "the patched clone keeps its own"
    # applying twice keeps one object patch per block (replaced, not stacked)
    twice = fa.apply(patched, fa.full_plan(pixart, 4))
    assert sorted(k for k in twice.object_patches if k.endswith(".attn.forward")) == \
        ["diffusion_model.blocks.0.attn.forward", "diffusion_model.blocks.1.attn.forward"]
    ref = fa.sample(pixart, POS, NEG, latent())
    assert torch.equal(fa.sample(twice, POS, NEG, latent()), ref)


def test_non_standard_block_is_left_alone_and_logged(fa, monkeypatch, caplog):
    model = tiny.tiny_pixart(seed=3)
    attn = model.model.diffusion_model.blocks[1].attn
    norm = torch.nn.LayerNorm(64)          # a qk-norm block: not the layout we re-route
    monkeypatch.setattr(attn, "q_norm", norm)
    monkeypatch.setattr(attn, "k_norm", torch.nn.LayerNorm(64))
    ref = fa.sample(model, POS, NEG, latent())
    with caplog.at_level("WARNING"):
        patched = fa.apply(model, fa.full_plan(model, 4))
    assert "block 1: qk-norm" in caplog.text
    assert "diffusion_model.blocks.1.attn.forward" not in patched.object_patches
    assert "diffusion_model.blocks.0.attn.forward" in patched.object_patches
    seen = spy_calls(fa, monkeypatch)
    assert torch.equal(fa.sample(patched, POS, NEG, latent()), ref)
    assert {s[0] for s in seen} == {"block.0"}
