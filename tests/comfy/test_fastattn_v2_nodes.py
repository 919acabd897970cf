"""Tier 2: DiTFastAttnV2 head-wise plans through the nodes: calibrate -> save -> load -> apply.

Families: Flux (joint attention, text tokens before the image: they stay global) and Wan (video).
Both budgets: the error budget and "attention FLOPs kept".
"""

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui

V2 = "V2 head-wise"


def _case(name):
    if name == "flux":
        return (tiny.tiny_flux(seed=0), tiny.conditioning(6, seed=1, pooled=8),
                tiny.conditioning(6, seed=2, pooled=8), tiny.image_latent(), (6, 0))
    return tiny.tiny_wan(seed=0), tiny.conditioning(7, seed=1), tiny.conditioning(5, seed=2), tiny.video_latent(), (0, 0)


def _calibrate(comfy, model, pos, neg, latent, **v2):
    return comfy.execute(
        "DiTFastAttnCalibrate", model=model, positive=pos, negative=neg, latent_image=latent, seed=0, steps=4,
        cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0, threshold=0.1, window_fraction=0.125,
        window_shape="1d", allow_output_share=True, allow_window=True, allow_cfg_share=True,
        filename_prefix="ditfastattn/v2", plan_version=V2, **v2)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_v2_calibrate_save_load_apply(fa, comfy, plans_dir, family):
    model, pos, neg, latent, text_tokens = _case(family)
    plan, image, report, calib_latent = _calibrate(comfy, model, pos, neg, latent, v2_budget="error", v2_alpha=0.5)
    meta = plan.metadata
    assert plan.granularity == "head" and plan.num_steps == 4 and meta.num_heads == 4
    assert tuple(meta.text_tokens) == text_tokens          # joint text tokens recorded (global)
    assert set(plan.methods[0][0]) == {"full_attn"}
    later = [m for step in plan.methods[1:] for cell in step for m in cell]
    assert any(m != "full_attn" for m in later), "a generous budget must compress some heads"
    assert meta.arrow_windows and meta.extra["v2_budget"] == "error"
    assert "V2 head-wise" in report and "attention FLOPs kept per method" in report
    assert image.ndim == 4 and image.shape[-1] == 3 and image.shape[1] > 100   # a readable figure
    saved = sorted(p.relative_to(plans_dir).as_posix() for p in plans_dir.rglob("*.json"))
    assert saved == ["ditfastattn/v2_00001.json"]

    loaded, summary = comfy.execute("DiTFastAttnLoadPlan", plan_name=saved[0], plan_json="")
    assert loaded == plan and "heads" in summary

    (patched,) = comfy.execute("DiTFastAttnApply", model=model, plan=loaded, enabled=True)
    out = fa.sample(patched, pos, neg, latent, steps=4, cfg=2.0)
    # applying the plan replays the calibration trajectory (V2 calibrates on the compressed run)
    torch.testing.assert_close(out, calib_latent["samples"], atol=1e-5, rtol=0)
    run = fa.patcher.installed_spec(patched).sink.last
    assert run.flops_kept < 1.0
    mixed = sum(1 for step in plan.methods for cell in step if len(set(cell)) > 1)
    assert run.method_counts.get("head-wise", 0) == mixed
    if mixed:      # calls whose heads ran different methods: the report counts heads per method
        assert "heads:" in run.summary_line() and sum(run.head_method_counts.values()) == mixed * 4


def test_v2_flops_kept_budget(fa, comfy, plans_dir):
    from importlib import import_module

    flops = import_module(comfy.pack_module.__name__ + ".fastattn.flops")
    model, pos, neg, latent, _ = _case("flux")
    plan, _, report, _ = _calibrate(comfy, model, pos, neg, latent, v2_budget="attention FLOPs kept",
                                    v2_flops_kept=0.6)
    assert plan.metadata.extra["v2_budget"] == "flops_kept" and plan.metadata.extra["v2_flops_kept"] == 0.6
    assert flops.headwise_plan_cost(plan).core_fraction <= 0.6 + 1e-9
    assert "attention FLOPs kept <= 60.0%" in report
    # a FLOPs target between "all full" and "all cached" makes heads of one call differ
    mixed = sum(1 for step in plan.methods for cell in step if len(set(cell)) > 1)
    assert mixed > 0
    (patched,) = comfy.execute("DiTFastAttnApply", model=model, plan=plan, enabled=True)
    fa.sample(patched, pos, neg, latent, steps=4, cfg=2.0)
    run = fa.patcher.installed_spec(patched).sink.last
    assert "heads:" in run.summary_line() and run.method_counts["head-wise"] >= mixed
    assert run.flops_kept == pytest.approx(flops.headwise_plan_cost(plan).core_fraction, rel=1e-6)


def test_v2_plan_refused_for_another_resolution(fa, comfy, plans_dir):
    model, pos, neg, latent, _ = _case("flux")
    plan, *_ = _calibrate(comfy, model, pos, neg, latent, v2_alpha=2.0)
    (patched,) = comfy.execute("DiTFastAttnApply", model=model, plan=plan, enabled=True)
    with pytest.raises(fa.PlanMismatchError, match="window|token grid"):
        fa.sample(patched, pos, neg, tiny.image_latent(size=16), steps=4, cfg=2.0)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_v2_extended_candidates_calibrate_and_replay(fa, comfy, plans_dir, family):
    """v2_candidates 'extended': WA-RS per head next to arrow and caching. The plan records
    the band of its WA-RS heads like a V1 plan; applying it replays the calibration trajectory
    (residuals refreshed only where a later WA-RS head reads them) and the report's FLOPs equal
    the plan's cost."""
    from importlib import import_module

    flops = import_module(comfy.pack_module.__name__ + ".fastattn.flops")
    model, pos, neg, latent, text_tokens = _case(family)
    plan, _, report, calib_latent = _calibrate(comfy, model, pos, neg, latent, v2_budget="attention FLOPs kept",
                                               v2_flops_kept=0.7, v2_candidates="extended: + WA-RS per head")
    meta = plan.metadata
    used = {m for step in plan.methods for cell in step for m in cell}
    assert "residual_window_attn" in used, used      # measured: both families pick WA-RS heads here
    assert "residual_window_attn" in meta.candidates and "full_attn+cfg_attn_share" not in meta.candidates
    assert meta.window == (round(0.125 * meta.num_tokens),) * 2
    assert meta.extra["window_shape"] == "1d" and meta.extra["window_fraction"] == 0.125
    (patched,) = comfy.execute("DiTFastAttnApply", model=model, plan=plan, enabled=True)
    out = fa.sample(patched, pos, neg, latent, steps=4, cfg=2.0)
    torch.testing.assert_close(out, calib_latent["samples"], atol=1e-5, rtol=0)
    run = fa.patcher.installed_spec(patched).sink.last
    assert run.flops_kept == pytest.approx(flops.headwise_plan_cost(plan, rows=2).core_fraction, rel=1e-6)
    assert run.flops_kept <= 0.7 + 1e-9      # the budget holds with the residual refreshes counted


def test_v2_extended_respects_the_allow_switches(fa, comfy):
    from importlib import import_module

    node = import_module(comfy.pack_module.__name__ + ".nodes.fastattn_nodes.calibrate_node")
    extended = node.V2_CANDIDATE_SETS[1]
    assert node.allowed_v2_candidates(True, True, node.V2_CANDIDATE_SETS[0]) == [
        "output_share", "arrow_attn_8", "arrow_attn_16", "arrow_attn_32"]
    assert node.allowed_v2_candidates(True, True, extended) == [
        "output_share", "arrow_attn_8", "arrow_attn_16", "arrow_attn_32", "residual_window_attn"]
    assert node.allowed_v2_candidates(True, False, extended) == ["output_share"]
    assert "v2_candidates" in node.input_problem(v2_candidates="everything")
