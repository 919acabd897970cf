"""Tier 2: plans without a recorded sigma schedule (official imports, diffusers calibrations,
hand-written plans) are checked against the run's evaluation count when the run starts.

Before, a 10-step plan applied to a 4-step run silently used its first 4 rows.
"""
import sys

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui

POS, NEG = tiny.conditioning(7, seed=1), tiny.conditioning(5, seed=2)
FULL, AST = "full_attn", "output_share"


def plan_without_schedule(fa, model, rows):
    """A hand-written plan: one method per evaluation for every layer, no sigmas, no schedule."""
    layers = fa.families.detect_family(model).layer_names(model.model.diffusion_model)
    return fa.Plan([[method] * len(layers) for method in rows], {"layer_names": layers, "architecture": "wan"})


class ForwardCounter:
    """Counts calls of the diffusion model (a forward pre-hook; the real model runs)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.model.diffusion_model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_longer_plan_is_refused_before_the_first_evaluation(fa, wan):
    patched = fa.apply(wan, fa.full_plan(wan, 10))
    with ForwardCounter(wan) as counter, pytest.raises(fa.PlanMismatchError) as info:
        fa.sample(patched, POS, NEG, tiny.video_latent(), steps=4)
    assert counter.calls == 0, "the mismatch must stop the run before the model runs"
    message = str(info.value)
    for words in ("steps", "10 denoiser evaluations", "makes 4", "4 steps of euler", "allow_remap"):
        assert words in message, f"{words!r} missing from: {message}"


def test_shorter_plan_is_refused_at_run_start(fa, wan):
    patched = fa.apply(wan, fa.full_plan(wan, 3))
    with ForwardCounter(wan) as counter, pytest.raises(fa.PlanMismatchError, match="3 denoiser evaluations"):
        fa.sample(patched, POS, NEG, tiny.video_latent(), steps=4)
    assert counter.calls == 0


def test_multi_evaluation_sampler_counts_its_evaluations(fa, wan):
    # heun: 2 evaluations per step, 1 on the last step to sigma 0: 4 steps -> 7 evaluations.
    ref = fa.sample(wan, POS, NEG, tiny.video_latent(), steps=4, sampler="heun")
    out = fa.sample(fa.apply(wan, fa.full_plan(wan, 7)), POS, NEG, tiny.video_latent(), steps=4, sampler="heun")
    assert torch.equal(out, ref)
    with pytest.raises(fa.PlanMismatchError, match="makes 7"):
        fa.sample(fa.apply(wan, fa.full_plan(wan, 4)), POS, NEG, tiny.video_latent(), steps=4, sampler="heun")


def test_remapping_a_plan_without_schedule_uses_relative_positions(fa, wan):
    # 10 rows: full for rows 0-2, output sharing from row 3 on. Mapped onto 4 evaluations by relative
    # position (rows 0, 3, 6, 9) that is full + 3 x AST; the old behaviour took rows 0-3 (3 full + 1 AST).
    plan = plan_without_schedule(fa, wan, [FULL, FULL, FULL] + [AST] * 7)
    patched = fa.apply(wan, plan, allow_remap=True)
    out = fa.sample(patched, POS, NEG, tiny.video_latent(), steps=4)
    assert torch.isfinite(out).all()
    report = fa.patcher.installed_spec(patched).sink.last
    assert report.evaluations == 4
    shared = report.method_counts.get(AST, 0)
    total = sum(report.method_counts.values())
    assert shared * 4 == total * 3, report.method_counts


# The same counts on a sample of ComfyUI's samplers, so a ComfyUI that changes one is noticed.
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc", "heun", "dpmpp_2s_ancestral", "seeds_3"])
def test_evaluation_table_matches_comfyui(fa, wan, sampler):
    import comfy.samplers

    sampling = sys.modules[fa.patcher.__name__.rsplit(".", 1)[0] + ".sampling"]
    name = fa.patcher._sampler_name(comfy.samplers.sampler_object(sampler))
    model_sampling = wan.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", 3)
    with ForwardCounter(wan) as counter:       # cfg 1: one model call per evaluation
        fa.sample(wan, POS, NEG, tiny.video_latent(), steps=3, cfg=1.0, sampler=sampler)
    assert sampling.expected_evaluations(name, sigmas) == counter.calls
