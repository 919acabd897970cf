"""Method map image, legend and text summary."""

import json

import numpy as np
import pytest

from fastattn.flops import AttentionShape
from fastattn.plan import AST, ASC, FULL, WARS, WARS_ASC, Plan
from fastattn.report import METHOD_STYLE, legend, legend_text, method_map, summarize

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
def _golden_plan(thr="0.15"):
    raw = json.loads((GOLDEN / f"calib_dit_thr{thr}_plan.json").read_text())
    return Plan.from_official(raw, {"threshold": float(thr), "window": [8, 8],
                                    "token_grid": [8, 8], "architecture": "DiTTransformer2DModel"})


def test_method_map_cells_have_method_colours():
    plan = _golden_plan()
    image = method_map(plan, cell=10, grid=1)
    assert image.shape == (4 * 10, 10 * 10, 3) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    for t in range(plan.num_steps):
        for i in range(plan.num_layers):
            centre = image[i * 10 + 4, t * 10 + 4]
            assert np.allclose(centre, METHOD_STYLE[plan.method(t, i)][0])
    # grid lines are dark
    assert np.allclose(image[9, 5], (0.08, 0.08, 0.08))


def test_method_colours_are_distinct():
    colours = {style[0] for style in METHOD_STYLE.values()}
    assert len(colours) == len(METHOD_STYLE)


def test_head_wise_map():
    plan = Plan([[[FULL, FULL]], [[AST, WARS]]], {"num_heads": 2}, granularity="head")
    image = method_map(plan, cell=9, grid=1)
    assert np.allclose(image[1, 10], METHOD_STYLE[AST][0])
    assert np.allclose(image[6, 10], METHOD_STYLE[WARS][0])


def test_huge_plan_map_stays_bounded():
    plan = Plan([[FULL] * 4] + [[AST] * 4] * 4999)
    image = method_map(plan, cell=12)
    assert max(image.shape[:2]) <= 5000


def test_legend():
    entries = legend()
    assert {e["method"] for e in entries} == set(METHOD_STYLE)
    assert all(e["colour"].startswith("#") and len(e["colour"]) == 7 for e in entries)
    text = legend_text(_golden_plan())
    assert "WA-RS + ASC" in text and "ASC (share" not in text  # only the methods used


def test_summary_text_and_bound():
    plan = _golden_plan()
    shape = AttentionShape(64, 4, 16, rows=2, window=(8, 8))
    report = summarize(plan, shape, attention_share=0.3)
    assert report.counts == {FULL: 5, AST: 32, WARS: 1, WARS_ASC: 2}
    assert 0 < report.cost.core_fraction < report.cost.module_fraction < 1
    assert report.speedup_bound_module == pytest.approx(
        1 / (0.7 + 0.3 * report.cost.module_fraction))
    assert "threshold 0.15" in report.text and "Amdahl" in report.text
    assert "window covers 24.8%" in report.text
    bare = summarize(Plan([[FULL], [ASC]]))
    assert bare.cost is None and "full attention 1 (50.0%)" in bare.text


def test_summary_takes_the_shape_from_metadata():
    plan = _golden_plan().with_metadata(num_heads=4, head_dim=16, cfg_scale=4.0,
                                        calibration_inputs=1)
    report = summarize(plan)
    explicit = summarize(plan, AttentionShape(64, 4, 16, rows=2, window=(8, 8)))
    assert report.cost == explicit.cost and "core (QK^T, PV)" in report.text


def test_flops_kept_per_method_add_up_to_the_plan_cost():
    from fastattn.flops import plan_cost
    from fastattn.report import method_flops_share

    plan = _golden_plan()
    shape = AttentionShape(64, 4, 16, rows=2, window=(8, 8))
    shares = method_flops_share(plan, shape)
    assert set(shares) == set(plan.method_counts())
    assert sum(shares.values()) == pytest.approx(plan_cost(plan, shape).core_fraction)
    assert shares[AST] == 0.0 and shares[FULL] > shares[WARS] > 0
    assert "attention FLOPs kept per method" in summarize(plan, shape).text


def test_method_map_figure_is_readable_on_its_own():
    from fastattn.report import method_map_figure

    plan = _golden_plan().with_metadata(num_heads=4, head_dim=16)
    figure = method_map_figure(plan, shape=AttentionShape(64, 4, 16, rows=2, window=(8, 8)))
    raw = method_map(plan, cell=14)
    assert figure.dtype == np.float32 and figure.ndim == 3 and figure.shape[2] == 3
    # bigger than the bare cells: room for title, axes and the legend; cells at least 14 px
    assert figure.shape[0] > raw.shape[0] + 80 and figure.shape[1] >= raw.shape[1]
    dark = (figure.sum(-1) < 0.9)
    assert dark[:40].any()                      # title text
    assert dark[:, :60].any()                   # layer tick labels on the left
    # every used method's colour appears as a legend swatch below the map
    below = figure[-22 * 6:]
    for method in plan.method_counts():
        assert np.isclose(below, METHOD_STYLE[method][0], atol=2 / 255).all(-1).any(), method


def test_method_map_figure_head_wise_and_tiny_plans():
    from fastattn.report import method_map_figure

    plan = Plan([[[FULL, FULL]], [[AST, WARS]]], {"num_heads": 2}, granularity="head")
    figure = method_map_figure(plan)
    assert figure.shape[0] >= 100 and figure.shape[1] >= 400
    one = method_map_figure(Plan([[FULL]]))
    assert one.shape[1] >= 400
