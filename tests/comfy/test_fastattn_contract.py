"""Tier 2 contract tests for the DiTFastAttn patch (in the style of diffusers' cache tests).

Tiny random native Wan and Flux models, real ComfyUI sampling (nodes.common_ksampler), the pack
loaded by ComfyUI's own loader.
"""
import copy

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui


WAN_POS, WAN_NEG = tiny.conditioning(7, seed=1), tiny.conditioning(5, seed=2)


def flux_conds():
    return tiny.conditioning(6, seed=1, pooled=8), tiny.conditioning(6, seed=2, pooled=8)


def snapshot_options(model):
    options = model.model_options.get("transformer_options", {})
    wrappers = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()}
    return dict(options), wrappers, dict(model.object_patches)


@pytest.fixture(scope="module")
def wan_plan(fa, wan):
    plan, calib_out, session = fa.calibrate(wan, WAN_POS, WAN_NEG, tiny.video_latent(), threshold=0.1)
    return plan, calib_out


def test_all_full_plan_is_bit_identical_to_unpatched(fa, wan, flux):
    ref = fa.sample(wan, WAN_POS, WAN_NEG, tiny.video_latent())
    got = fa.sample(fa.apply(wan, fa.full_plan(wan, 4)), WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.equal(ref, got)
    pos, neg = flux_conds()
    ref = fa.sample(flux, pos, neg, tiny.image_latent())
    got = fa.sample(fa.apply(flux, fa.full_plan(flux, 4)), pos, neg, tiny.image_latent())
    assert torch.equal(ref, got)


def test_calibrated_plan_compresses_and_reproduces_calibration_run(fa, wan, wan_plan):
    plan, calib_out = wan_plan
    counts = plan.method_counts()
    assert set(plan.methods[0]) == {"full_attn"}, "evaluation 0 must be full attention"
    assert sum(n for m, n in counts.items() if m != "full_attn") > 0, f"nothing compressed: {counts}"
    patched = fa.apply(wan, plan)
    out = fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent())
    # The calibration trajectory is the compressed one: applying the plan reproduces it exactly.
    assert torch.equal(out, calib_out)
    ref = fa.sample(wan, WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref), "a compressing plan must change the output"
    report = fa.patcher.installed_spec(patched).sink.last
    assert report.flops_kept < 1.0 and report.compressible_calls == 4 * 2 * 2
    assert sum(report.method_counts.values()) == report.compressible_calls


def test_input_model_is_never_modified(fa, wan, wan_plan):
    before = snapshot_options(wan)
    patched = fa.apply(wan, wan_plan[0])
    fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent())
    assert snapshot_options(wan) == before
    assert "optimized_attention_override" not in wan.model_options.get("transformer_options", {})
    assert fa.patcher.installed_spec(wan) is None


def test_apply_twice_is_idempotent(fa, wan, wan_plan):
    once = fa.apply(wan, wan_plan[0])
    twice = fa.apply(once, wan_plan[0])
    for wrappers in twice.wrappers.values():
        assert len(wrappers.get("ditfastattn", [])) <= 1
    a = fa.sample(once, WAN_POS, WAN_NEG, tiny.video_latent())
    b = fa.sample(twice, WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.equal(a, b)


def test_remove_and_disabled_node_restore_the_unpatched_model(fa, wan, wan_plan, comfy):
    ref = fa.sample(wan, WAN_POS, WAN_NEG, tiny.video_latent())
    patched = fa.apply(wan, wan_plan[0])
    removed = fa.patcher.remove_patch(patched)
    assert torch.equal(fa.sample(removed, WAN_POS, WAN_NEG, tiny.video_latent()), ref)
    (disabled,) = comfy.execute("DiTFastAttnApply", model=patched, plan=wan_plan[0], enabled=False)
    assert fa.patcher.installed_spec(disabled) is None
    assert torch.equal(fa.sample(disabled, WAN_POS, WAN_NEG, tiny.video_latent()), ref)
    # the patched model still works after its removal produced another clone
    assert torch.equal(fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent()), wan_plan[1])


def test_state_never_leaks_between_runs_or_clones(fa, wan, wan_plan):
    patched = fa.apply(wan, wan_plan[0])
    first = fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent())
    second = fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.equal(first, second)
    # no run state left in the patched model's options after a run
    assert "ditfastattn_run" not in patched.model_options["transformer_options"]
    # another patched clone with a different plan, interleaved, is independent
    other = fa.apply(wan, fa.full_plan(wan, 4))
    ref = fa.sample(wan, WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.equal(fa.sample(other, WAN_POS, WAN_NEG, tiny.video_latent()), ref)
    assert torch.equal(fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent()), first)


def test_downstream_clone_shares_the_patch_not_a_copy(fa, wan, wan_plan):
    # ModelPatcher.clone deep-copies model_options: the spec must survive as the same object.
    patched = fa.apply(wan, wan_plan[0])
    downstream = patched.clone()
    assert fa.patcher.installed_spec(downstream) is fa.patcher.installed_spec(patched)
    copied = copy.deepcopy(patched.model_options)
    assert copied["transformer_options"]["ditfastattn_spec"] is fa.patcher.installed_spec(patched)
    out = fa.sample(downstream, WAN_POS, WAN_NEG, tiny.video_latent())
    assert torch.equal(out, wan_plan[1])


def test_chains_a_previously_installed_attention_override(fa, wan, wan_plan):
    calls = []

    def other_override(func, *args, **kwargs):      # e.g. a SageAttention patch
        calls.append(kwargs.get("transformer_options", {}).get("cond_or_uncond"))
        return func(*args, **kwargs)

    base = wan.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    ref = fa.sample(base, WAN_POS, WAN_NEG, tiny.video_latent())
    n_plain = len(calls)
    calls.clear()
    patched = fa.apply(base, fa.full_plan(wan, 4))
    assert torch.equal(fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent()), ref)
    assert len(calls) == n_plain, "the earlier override must still see every attention call"
    # removing DiTFastAttn gives the earlier override back
    removed = fa.patcher.remove_patch(patched)
    assert removed.model_options["transformer_options"]["optimized_attention_override"] is other_override


def test_unknown_architecture_is_a_logged_no_op(fa, comfy, wan_plan, caplog):
    import comfy.model_patcher

    class NotADiT(torch.nn.Module):
        pass

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = NotADiT()

    model = comfy.model_patcher.ModelPatcher(Holder(), load_device="cpu", offload_device="cpu")
    with caplog.at_level("WARNING"):
        patched = fa.apply(model, wan_plan[0])
    assert fa.patcher.installed_spec(patched) is None
    assert "not supported" in caplog.text


def test_plan_mismatch_errors_are_clear(fa, wan, wan_plan, flux):
    plan = wan_plan[0]
    patched = fa.apply(wan, plan)
    with pytest.raises(fa.PlanMismatchError, match="steps"):
        fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent(), steps=6)
    with pytest.raises(fa.PlanMismatchError, match="token grid"):
        fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent(size=12))
    with pytest.raises(fa.PlanMismatchError, match="sampler"):
        fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent(), sampler="dpmpp_2m")
    with pytest.raises(fa.PlanMismatchError, match="CFG"):
        fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent(), cfg=3.0)
    with pytest.raises(fa.PlanMismatchError, match="layers"):
        fa.apply(flux, plan)
    with pytest.raises(fa.PlanMismatchError, match="weights"):
        fa.apply(tiny.tiny_wan(seed=5), plan)
    # waived on request
    fa.apply(tiny.tiny_wan(seed=5), plan, ignore_model_mismatch=True)
    # a failed run leaves the model usable
    assert torch.equal(fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent()), wan_plan[1])


def test_remap_by_noise_level_when_allowed(fa, wan, wan_plan):
    patched = fa.apply(wan, wan_plan[0], allow_remap=True)
    out = fa.sample(patched, WAN_POS, WAN_NEG, tiny.video_latent(), steps=6)
    assert torch.isfinite(out).all()
    report = fa.patcher.installed_spec(patched).sink.last
    assert report.evaluations == 6 and report.flops_kept < 1.0


def test_compare_and_report_nodes(fa, wan, wan_plan, comfy):
    patched = fa.apply(wan, wan_plan[0])
    patched_latent, full_latent, text = comfy.execute(
        "DiTFastAttnCompare", model=patched, positive=WAN_POS, negative=WAN_NEG,
        latent_image=tiny.video_latent(), seed=0, steps=4, cfg=2.0, sampler_name="euler",
        scheduler="simple", denoise=1.0)
    assert torch.equal(patched_latent["samples"], wan_plan[1])
    assert torch.equal(full_latent["samples"], fa.sample(wan, WAN_POS, WAN_NEG, tiny.video_latent()))
    assert "latent PSNR" in text and "attention FLOPs kept" in text
    report, report_json = comfy.execute("DiTFastAttnReport", model=patched, samples=patched_latent)
    import json

    data = json.loads(report_json)
    assert data["evaluations"] == 4 and 0 < data["flops_kept"] < 1 and report.startswith("DiTFastAttn (wan")
    (unpatched_report, _) = comfy.execute("DiTFastAttnReport", model=wan, samples=patched_latent)
    assert "not patched" in unpatched_report
