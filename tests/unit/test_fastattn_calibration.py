"""Greedy calibration core: loss, thresholds, search order and the loop-driven protocol.

The golden reproduction through a real diffusers DiT lives in test_fastattn_diffusers_golden.py.
Here a small explicit target checks the search logic (order, strictness, cumulative choices,
no state writes during trials) independently of any model library.
"""

import json

import pytest
import torch

from fastattn.calibration import (OFFICIAL_CANDIDATES, CalibrationTarget, GreedyCalibration,
                                  calibrate_target, layer_thresholds, official_loss)
from fastattn.plan import AST, ASC, FULL, WARS, WARS_ASC, Plan

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
def test_official_loss_uses_signed_elementwise_max():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([1.5, -1.0, -1e-3, 3.0])
    # by hand: |(a-b)/(max(a,b)+1e-6)| clipped to [0, 10]
    expected = [0.5 / 1.500001, 1.0 / (-1.0 + 1e-6), 1e-3 / 1e-6, 0.0]
    expected = sum(min(abs(x), 10.0) for x in expected) / 4
    assert official_loss(a, b) == pytest.approx(expected, rel=1e-6)
    # the paper's max(|a|, |b|) would give a different (smaller) value here
    paper = ((a - b).abs() / (torch.maximum(a.abs(), b.abs()) + 1e-6)).clamp(0, 10).mean()
    assert abs(official_loss(a, b) - float(paper)) > 1.0


def test_official_loss_averages_tuple_outputs_and_checks_shapes():
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    single = official_loss(a, b)
    assert official_loss((a, a), (b, a)) == pytest.approx(single / 2)
    with pytest.raises(ValueError, match="shapes"):
        official_loss(a, torch.ones(3, 2))
    with pytest.raises(TypeError):
        official_loss("x", "y")


@pytest.mark.parametrize("delta", [0.005, 0.025, 0.075, 0.15])
def test_thresholds_equal_golden_floats(delta):
    trials = json.loads((GOLDEN / f"calib_dit_thr{delta}_trials.json").read_text())["trials"]
    expected = {t["block"]: t["threshold"] for t in trials}
    got = layer_thresholds(4, delta)
    assert all(got[i] == expected[i] for i in expected)  # bit-exact floats


class LinearTarget:
    """A deterministic stand-in transformer: output = sum of per-layer contributions.

    Layer i with method m contributes ``base[i] * (1 + error[m] * weight[i])``; a committed step
    updates an explicit cache counter, which trials must leave alone.
    """

    error = {FULL: 0.0, AST: 0.9, WARS_ASC: 0.5, WARS: 0.2, ASC: 0.05}

    def __init__(self, num_layers=3, num_steps=4):
        self.num_layers, self.num_steps = num_layers, num_steps
        self.base = torch.arange(1.0, 1.0 + 8)
        self.weights = [0.01, 0.2, 1.0][:num_layers]
        self.commits = []
        self.trial_calls = 0

    def run_step(self, step, methods, *, commit):
        out = torch.zeros(8)
        for i, m in enumerate(methods):
            out = out + self.base * (1 + self.error[m] * self.weights[i])
        if commit:
            self.commits.append((step, list(methods)))
        else:
            self.trial_calls += 1
        return out


def test_loop_driven_calibration_is_greedy_and_strict():
    target = LinearTarget()
    assert isinstance(target, CalibrationTarget)
    search = calibrate_target(target, threshold=0.15)
    # thresholds 0.05 / 0.1 / 0.15. Losses |e/(3+e)| with e the summed error: layer 0 AST
    # 0.003, layer 1 AST (cumulative) 0.059; layer 2 AST 0.266, WA-RS+ASC 0.187, WA-RS 0.115.
    assert search.methods[0] == [FULL] * 3
    assert search.methods[1:] == [[AST, AST, WARS]] * 3
    assert [c[0] for c in target.commits] == [0, 1, 2, 3]
    assert all(c[1] == search.methods[c[0]] for c in target.commits)
    for step_trials in [[t for t in search.trials if t.step == s] for s in (1, 2, 3)]:
        for layer in range(3):
            tried = [t for t in step_trials if t.layer == layer]
            order = [t.method for t in tried]
            assert order == list(OFFICIAL_CANDIDATES[:len(order)])
            assert all(not t.accepted for t in tried[:-1])
            assert all(t.threshold == (layer + 1) / 3 * 0.15 for t in tried)
    plan = search.to_plan(architecture="linear")
    assert isinstance(plan, Plan) and plan.metadata.threshold == 0.15
    assert plan.metadata.candidates == OFFICIAL_CANDIDATES
    # 1 reference + trials per searched step
    assert target.trial_calls == 3 + len(search.trials)


def test_threshold_zero_keeps_everything_full():
    search = calibrate_target(LinearTarget(), threshold=0.0)
    assert all(m == FULL for row in search.methods for m in row)
    assert search.to_plan().method_counts() == {FULL: 12}


def test_search_step_protocol_errors():
    search = GreedyCalibration(2, 2, 0.1)
    search.search_step(0, lambda m: torch.ones(1))
    with pytest.raises(RuntimeError, match="already calibrated"):
        search.search_step(0, lambda m: torch.ones(1))
    with pytest.raises(IndexError):
        search.search_step(5, lambda m: torch.ones(1))
    with pytest.raises(RuntimeError, match="1 of 2 steps"):
        search.to_plan()
    with pytest.raises(ValueError, match="candidate"):
        GreedyCalibration(2, 2, 0.1, candidates=["bogus"])
    with pytest.raises(ValueError, match="threshold"):
        GreedyCalibration(2, 2, -1)


def test_progress_callback_sees_every_trial():
    seen = []
    search = calibrate_target(LinearTarget(), 0.3, progress=lambda s, l, t: seen.append(t))
    assert seen == search.trials


def test_to_plan_can_keep_the_first_steps():
    search = GreedyCalibration(2, 5, 0.1)
    for step in range(3):
        search.search_step(step, lambda m: torch.ones(1))
    plan = search.to_plan(num_steps=3)
    assert plan.num_steps == 3
    with pytest.raises(RuntimeError):
        search.to_plan(num_steps=4)
    with pytest.raises(ValueError):
        search.to_plan(num_steps=0)


def test_stepped_runtime_target_trials_leave_caches_and_sampler_alone():
    """SteppedRuntimeTarget (a model whose attention goes through one FastAttnRuntime): trials
    restore every cache, only the committed call per step moves the sampler, and a layer whose
    cached output is reused (AST) returns exactly the committed previous step's output."""
    from fastattn.calibration import SteppedRuntimeTarget
    from fastattn.windows import Window1D

    generator = torch.Generator().manual_seed(0)
    projections = [torch.randn(8, 3 * 8, generator=generator) / 3 for _ in range(2)]
    latent = {"x": torch.randn(2, 16, 8, generator=generator), "advanced": []}
    outputs = {}

    def model_output(step, runtime):
        h = latent["x"]
        for layer, weight in enumerate(projections):
            q, k, v = (h @ weight).chunk(3, dim=-1)
            out = runtime(q, k, v, layer=layer, step=step, heads=2, layout="blc", cfg_rows=[0, 1])
            outputs[(step, layer, runtime.methods_for(step, layer))] = out
            h = h + out
        return h

    def advance(step, output):
        latent["advanced"].append(step)
        latent["x"] = output / output.norm()

    target = SteppedRuntimeTarget(2, 3, model_output, advance, Window1D(4, 4))
    search = calibrate_target(target, threshold=1e9, candidates=[AST])   # AST everywhere after step 0
    assert latent["advanced"] == [0, 1, 2]
    assert search.methods[0] == [FULL, FULL] and search.methods[1] == [AST, AST]
    state = target.runtime.state
    assert set(state.keys()) == {(0, (0, 1)), (1, (0, 1))}
    # the committed step-0 outputs are what the AST steps returned
    for layer in (0, 1):
        assert torch.equal(outputs[(1, layer, AST)], outputs[(0, layer, FULL)])


def test_stepped_runtime_target_restores_caches_when_a_trial_raises_and_refuses_a_planner():
    from fastattn.calibration import SteppedRuntimeTarget

    calls = {"n": 0}

    def model_output(step, runtime):
        calls["n"] += 1
        q = torch.randn(1, 8, 4)
        runtime(q, q, q, layer=0, step=step, heads=1, layout="blc")   # full attention caches
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return q

    target = SteppedRuntimeTarget(1, 2, model_output, lambda step, out: None, None,
                                  needs_residual=lambda s, l: False)
    target.run_step(0, [FULL], commit=True)
    kept = target.runtime.state.snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        target.run_step(1, [FULL], commit=False)
    layers, _ = target.runtime.state.snapshot()
    assert all(layers[key][0] is kept[0][key][0] for key in kept[0])
    with pytest.raises(ValueError, match="planner"):
        SteppedRuntimeTarget(1, 1, model_output, lambda s, o: None, None, planner=object())
