"""Tier 2 compatibility matrix for DiTFastAttn on tiny native models.

Every case calibrates a plan in the given configuration, then samples the patched model with the
same settings: the result must be bit-identical to the calibration run (the calibration trajectory
is the compressed one), which only holds if step identity, CFG handling and cache lifetimes are
right for that configuration.
"""
import sys

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui


def wan_case(cfg=2.0, split=True, batch=1):
    pos = tiny.conditioning(7, seed=1)
    neg = tiny.conditioning(5 if split else 7, seed=2)
    return pos, neg, tiny.video_latent(batch=batch)


CASES = {
    "euler_cfg2_split": dict(sampler="euler"),
    "euler_cfg2_batched": dict(sampler="euler", split=False),
    "euler_cfg1": dict(sampler="euler", cfg=1.0),
    "batch2_batched": dict(sampler="euler", split=False, batch=2),
    "dpmpp_2m": dict(sampler="dpmpp_2m", split=False),
    "heun": dict(sampler="heun"),
    "denoise_0.6": dict(sampler="euler", denoise=0.6, split=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wan_calibrate_then_apply_reproduces(fa, wan, case):
    opts = dict(CASES[case])
    cfg, split, batch = opts.pop("cfg", 2.0), opts.pop("split", True), opts.pop("batch", 1)
    pos, neg, latent = wan_case(cfg, split, batch)
    settings = dict(cfg=cfg, steps=4, **opts)
    plan, calib_out, _ = fa.calibrate(wan, pos, neg, latent, threshold=0.15, **settings)
    patched = fa.apply(wan, plan)
    out = fa.sample(patched, pos, neg, latent, **settings)
    assert torch.equal(out, calib_out)
    report = fa.patcher.installed_spec(patched).sink.last
    expected_evaluations = 7 if opts.get("sampler") == "heun" else 4
    assert plan.num_steps == expected_evaluations == report.evaluations
    assert report.flops_kept < 1.0, plan.method_counts()


@pytest.mark.parametrize("layout", ["batched", "split", "cfg1"])
def test_cfg_sharing_however_comfyui_batches(fa, wan, layout):
    """ASC everywhere after evaluation 0: half the rows when batched, the uncond call reuses the
    cond call when split, and nothing to share (ASC off) with cfg = 1."""
    pos, neg, latent = wan_case(cfg=1.0 if layout == "cfg1" else 2.0, split=layout != "batched")
    layers = fa.families.detect_family(wan).layer_names(wan.model.diffusion_model)
    methods = [["full_attn"] * 2] + [["full_attn+cfg_attn_share"] * 2] * 3
    plan = fa.Plan(methods, {"layer_names": layers, "architecture": "wan"})
    patched = fa.apply(wan, plan)
    out = fa.sample(patched, pos, neg, latent, cfg=1.0 if layout == "cfg1" else 2.0)
    assert torch.isfinite(out).all()
    report = fa.patcher.installed_spec(patched).sink.last
    if layout == "cfg1":
        assert report.flops_kept == pytest.approx(1.0)
        ref = fa.sample(wan, pos, neg, latent, cfg=1.0)
        assert torch.equal(out, ref), "with cfg = 1 ASC must switch itself off"
    else:
        assert report.flops_kept == pytest.approx((1 + 3 * 0.5) / 4)


def test_flux_joint_attention_matrix(fa, flux):
    pos, neg = tiny.conditioning(6, seed=1, pooled=8), tiny.conditioning(6, seed=2, pooled=8)
    for settings in (dict(cfg=2.0), dict(cfg=1.0), dict(cfg=2.0, sampler="dpmpp_2m")):
        latent = tiny.image_latent()
        plan, calib_out, _ = fa.calibrate(flux, pos, neg, latent, threshold=0.15, **settings)
        patched = fa.apply(flux, plan)
        out = fa.sample(patched, pos, neg, latent, **settings)
        assert torch.equal(out, calib_out), settings
        assert len(plan.metadata.layer_names) == 4     # 2 double + 2 single blocks


def test_flux_window_keeps_text_tokens_global(fa, flux):
    """A WA-RS plan on Flux's joint attention: the window sees text as prefix tokens."""
    pos, neg = tiny.conditioning(6, seed=1, pooled=8), tiny.conditioning(6, seed=2, pooled=8)
    layers = fa.families.detect_family(flux).layer_names(flux.model.diffusion_model)
    plan = fa.Plan([["full_attn"] * 4] + [["residual_window_attn"] * 4] * 3,
                   {"layer_names": layers, "architecture": "flux",
                    "extra": {"window_shape": "1d", "window_fraction": 0.125}})
    seen = []
    patched = fa.apply(flux, plan)
    run_state = sys.modules[fa.patcher.RunState.__module__]
    original = run_state.RunState.attend

    def spy(self, **kw):
        seen.append((kw["prefix_tokens"], kw["suffix_tokens"], kw["token_grid"]))
        return original(self, **kw)

    run_state.RunState.attend = spy
    try:
        out = fa.sample(patched, pos, neg, tiny.image_latent())
    finally:
        run_state.RunState.attend = original
    assert torch.isfinite(out).all()
    assert seen and all(s == (6, 0, (4, 4)) for s in seen), set(seen)


def test_two_samplers_in_one_graph_and_a_second_stage(fa, wan):
    pos, neg, latent = wan_case()
    plan, calib_out, _ = fa.calibrate(wan, pos, neg, latent, threshold=0.15)
    patched = fa.apply(wan, plan)
    other_seed = fa.sample(patched, pos, neg, latent, seed=7)
    assert torch.equal(fa.sample(patched, pos, neg, latent), calib_out)
    assert torch.equal(fa.sample(patched, pos, neg, latent, seed=7), other_seed)
    # a refining second pass (denoise 0.5) needs another schedule: refused unless remapping
    with pytest.raises(fa.PlanMismatchError):
        fa.sample(patched, pos, neg, {"samples": calib_out}, denoise=0.5)
    remapping = fa.apply(wan, plan, allow_remap=True)
    refined = fa.sample(remapping, pos, neg, {"samples": calib_out}, denoise=0.5)
    assert torch.isfinite(refined).all()


def test_stacks_with_core_easycache(fa, wan, comfy):
    pos, neg, latent = wan_case()
    plan, calib_out, _ = fa.calibrate(wan, pos, neg, latent, threshold=0.15, steps=8)
    patched = fa.apply(wan, plan)
    (cached,) = comfy.execute("EasyCache", model=patched, reuse_threshold=0.2, start_percent=0.15,
                              end_percent=0.95, verbose=False)
    out = fa.sample(cached, pos, neg, latent, steps=8)
    assert torch.isfinite(out).all()
    report = fa.patcher.installed_spec(cached).sink.last
    assert report.evaluations == 8, "DiTFastAttn must count evaluations even when EasyCache skips"
    # and in the other order
    (cached_first,) = comfy.execute("EasyCache", model=wan, reuse_threshold=0.2, start_percent=0.15,
                                    end_percent=0.95, verbose=False)
    out2 = fa.sample(fa.apply(cached_first, plan), pos, neg, latent, steps=8)
    assert torch.equal(out, out2)


def test_wrappers_stack_with_torch_compile_model(fa, wan, comfy):
    """TorchCompileModel adds its own keyed wrapper; ours stay intact (compiling itself is not run:
    inductor on a 2-core CPU takes minutes; see docs/ditfastattn_nodes.md)."""
    pos, neg, latent = wan_case()
    plan = fa.full_plan(wan, 4)
    patched = fa.apply(wan, plan)
    (compiled,) = comfy.execute("TorchCompileModel", model=patched, backend="inductor")
    keys = {key for wrappers in compiled.wrappers.values() for key in wrappers}
    assert "ditfastattn" in keys and len(keys) >= 2, keys
    assert fa.patcher.installed_spec(compiled) is fa.patcher.installed_spec(patched)
    again = fa.apply(compiled, plan)
    keys_again = {key for wrappers in again.wrappers.values() for key in wrappers}
    assert keys_again == keys


def test_lora_patched_model(fa, wan):
    import comfy.sd

    pos, neg, latent = wan_case()
    generator = torch.Generator().manual_seed(3)
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        module = wan.model.diffusion_model.get_submodule(name)
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.1
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.1
    lora_model, _ = comfy.sd.load_lora_for_models(wan, None, lora, 1.0, 0.0)
    assert torch.not_equal(fa.sample(lora_model, pos, neg, latent), fa.sample(wan, pos, neg, latent)).any()
    plan, calib_out, _ = fa.calibrate(lora_model, pos, neg, latent, threshold=0.15)
    out = fa.sample(fa.apply(lora_model, plan), pos, neg, latent)
    assert torch.equal(out, calib_out)
    # LoRA weights are applied in memory; the fingerprint looks at the base weights, so a plan
    # calibrated on the LoRA model also applies to the base model (and vice versa).
    fa.apply(wan, plan)
