"""Corrected attention accounting, checked by brute force and against the official counter."""

import json

import pytest
import torch

from fastattn.flops import (AttentionShape, amdahl_speedup_bound, method_cost,
                            official_counter_macs, plan_cost, residual_steps, window_pairs)
from fastattn.plan import AST, ASC, FULL, WA_NO_RESIDUAL, WARS, WARS_ASC, Plan

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
# the golden DiT: 64 tokens, 4 heads x 16, one calibration label -> CFG batch of 2
DIT = AttentionShape(tokens=64, heads=4, head_dim=16, rows=2, cfg=True, window=(8, 8))


def _brute_pairs(n, left, right):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return int(((j >= i - left) & (j <= i + right)).sum())


@pytest.mark.parametrize("n, left, right", [(64, 8, 8), (64, 3, 5), (64, 0, 0), (64, 64, 64),
                                            (10, 100, 2), (1024, 128, 128), (1, 4, 4)])
def test_window_pairs_exact(n, left, right):
    assert window_pairs(n, (left, right)) == _brute_pairs(n, left, right)


def test_window_pairs_rejects_negative_sides():
    with pytest.raises(ValueError, match="unbounded"):
        window_pairs(64, (-8, 8))


def test_window_objects_with_kept_pairs_are_used():
    class Spec:
        def kept_pairs(self, n):
            return 7

    assert window_pairs(64, Spec()) == 7


def test_paper_window_fraction_is_about_quarter():
    # w = N/8 per side: about 23.5 % of the scores after clipping (spec 1.3)
    shape = AttentionShape(tokens=1024, heads=16, head_dim=72, window=(128, 128))
    assert shape.window_fraction() == pytest.approx(0.235, abs=0.001)


def test_method_costs():
    full = method_cost(FULL, DIT)
    n, d, b = 64, 64, 2
    assert full.core == 2 * b * n * n * d
    assert full.projections == 4 * b * n * d * d
    win = window_pairs(64, (8, 8))
    assert method_cost(WARS, DIT).core == 2 * b * win * d
    assert method_cost(WA_NO_RESIDUAL, DIT).core == 2 * b * win * d
    assert method_cost(FULL, DIT, stores_residual=True).core == 2 * b * (n * n + win) * d
    assert method_cost(ASC, DIT).module == full.module / 2
    assert method_cost(WARS_ASC, DIT).core == method_cost(WARS, DIT).core / 2
    assert method_cost(AST, DIT).module == 0
    no_cfg = AttentionShape(64, 4, 16, rows=1, cfg=False, window=(8, 8))
    assert method_cost(ASC, no_cfg).core == method_cost(FULL, no_cfg).core  # nothing to share


def test_residual_steps_matches_official_rule():
    methods = [FULL, WARS, FULL, AST, FULL, ASC, WARS_ASC, AST, WARS]
    assert residual_steps(methods) == [True, False, False, False, False, True, False, False,
                                       False]
    assert residual_steps([FULL, AST, WA_NO_RESIDUAL]) == [False, False, False]


@pytest.mark.parametrize("thr", ["0.005", "0.025", "0.075", "0.15"])
def test_official_counter_reproduced_and_corrected(thr):
    plan = Plan.from_official(json.loads((GOLDEN / f"calib_dit_thr{thr}_plan.json").read_text()))
    official = MANIFEST["calib_dit"]["runs"][thr]["official_flops"]["attn_macs_G"]
    assert official_counter_macs(plan, DIT, [8, 8]) / 1e9 == pytest.approx(official, rel=1e-9)
    # the corrected count is larger whenever WA-RS is used (official: WA-RS free)
    cost = plan_cost(plan, DIT)
    counts = plan.method_counts()
    if counts.get(WARS) or counts.get(WARS_ASC):
        assert cost.core > official * 1e9
    raw = MANIFEST["calib_dit"]["official_flops_raw"]["attn_macs_G"]
    assert cost.core_full / 1e9 == pytest.approx(raw, rel=1e-9)


def test_plan_cost_by_hand_for_golden_015():
    plan = Plan.from_official(json.loads((GOLDEN / "calib_dit_thr0.15_plan.json").read_text()))
    n, d, b = 64, 64, 2
    win = window_pairs(64, (8, 8))
    full = 2 * b * n * n * d
    window = 2 * b * win * d
    # step 0: 4 full, blocks 1-3 store a residual; block 0 full again at step 1;
    # block 1 WA-RS at step 1; blocks 2-3 WA-RS+ASC at step 1; everything else AST
    expected = 5 * full + 3 * window + window + 2 * window / 2
    cost = plan_cost(plan, DIT)
    assert cost.core == pytest.approx(expected)
    assert cost.core_fraction == pytest.approx(expected / (40 * full))
    proj = 4 * b * n * d * d
    assert cost.module == pytest.approx(expected + 6 * proj + 2 * proj / 2)
    assert len(cost.per_step_layer_core) == 10 and cost.per_step_layer_core[2] == (0, 0, 0, 0)


def test_amdahl():
    assert amdahl_speedup_bound(0.5, 0.0) == pytest.approx(2.0)
    assert amdahl_speedup_bound(0.0, 0.1) == 1.0
    assert amdahl_speedup_bound(0.7, 0.24) == pytest.approx(1 / (0.3 + 0.7 * 0.24))
    with pytest.raises(ValueError):
        amdahl_speedup_bound(1.5, 0.5)


def test_shape_from_plan_metadata():
    plan = Plan([[FULL] * 2, [AST, WARS]], {"token_grid": [8, 8], "num_heads": 4, "head_dim": 16,
                                           "window": [8, 8], "cfg_scale": 4.0,
                                           "calibration_inputs": 1})
    shape = AttentionShape.from_plan(plan)
    assert shape == AttentionShape(64, 4, 16, rows=2, cfg=True, window=(8, 8))
    with pytest.raises(ValueError, match="lacks"):
        AttentionShape.from_plan(Plan([[FULL]]))
