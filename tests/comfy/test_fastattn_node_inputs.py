"""Tier 2: the DiTFastAttn nodes refuse bad inputs before any sampling, and never lose a calibration.

Inputs are checked inside the nodes (``validate_inputs`` for HTTP 400 at /prompt and again in
``execute``) because not every supported ComfyUI validates V3 combo values (0.3.64 does not).
"""
import inspect
import os
import stat

import pytest

from testkit import fastattn_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.comfyui

POS, NEG = tiny.conditioning(7, seed=1), tiny.conditioning(5, seed=2)


@pytest.fixture
def sampling_runs(fa, monkeypatch):
    """Counts the calibrate node's sampling runs (the real sampler still runs)."""
    runs = []
    real = fa.calibrate_node.sample_latent

    def counted(*args, **kwargs):
        runs.append(kwargs.get("steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fa.calibrate_node, "sample_latent", counted)
    return runs


def calibrate_inputs(model, **overrides):
    inputs = dict(model=model, positive=POS, negative=NEG, latent_image=tiny.video_latent(), seed=0, steps=3,
                  cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0, threshold=0.1,
                  window_fraction=0.125, window_shape="1d", allow_output_share=True, allow_window=True,
                  allow_cfg_share=True, filename_prefix="ditfastattn/plan")
    inputs.update(overrides)
    return inputs


def validate(node, inputs):
    """Call validate_inputs as ComfyUI's executor does: with the widget values its signature names
    (linked inputs are absent)."""
    wanted = inspect.signature(node.validate_inputs).parameters
    return node.validate_inputs(**{k: v for k, v in inputs.items() if k in wanted
                                   and k not in ("model", "positive", "negative", "latent_image")})


# ---- finding 3: filename_prefix is checked before the (possibly hours-long) calibration ----------------
@pytest.mark.parametrize("prefix", ["my plan", "../outside", "/etc/plan", "ditfastattn/../../x", "a\\b"])
def test_calibrate_refuses_a_bad_filename_prefix_before_sampling(fa, comfy, wan, plans_dir, sampling_runs,
                                                                  prefix):
    node = comfy.node("DiTFastAttnCalibrate")
    inputs = calibrate_inputs(wan, filename_prefix=prefix)
    verdict = validate(node, inputs)
    assert isinstance(verdict, str) and "filename_prefix" in verdict and repr(prefix) in verdict
    with pytest.raises(ValueError, match="filename_prefix") as info:
        comfy.execute("DiTFastAttnCalibrate", **inputs)
    assert "letters, digits" in str(info.value)
    assert sampling_runs == [], "the calibration ran before the prefix was checked"
    assert list(plans_dir.rglob("*")) == []


def test_calibration_is_saved_under_a_fallback_name_when_saving_fails(fa, comfy, wan, plans_dir,
                                                                       sampling_runs):
    # A valid prefix whose folder cannot be created: a file already has that name. This only fails
    # at save time, after the whole calibration.
    (plans_dir / "blocked").write_text("not a folder")
    plan, _, report, _ = comfy.execute("DiTFastAttnCalibrate",
                                       **calibrate_inputs(wan, filename_prefix="blocked/plan"))
    assert sampling_runs == [3]
    assert isinstance(plan, fa.Plan) and plan.num_steps == 3
    saved = sorted(p.relative_to(plans_dir).as_posix() for p in plans_dir.rglob("*.json"))
    assert saved == ["ditfastattn/unsaved_calibration_00001.json"], saved
    assert "could not save" in report and "blocked/plan" in report
    assert "ditfastattn/unsaved_calibration_00001.json" in report
    assert fa.Plan.load(plans_dir / saved[0]) == plan
    assert (plans_dir / "blocked").read_text() == "not a folder"


def test_calibrate_saves_plans_readable_like_other_outputs(fa, comfy, wan, plans_dir):
    old = os.umask(0o022)
    try:
        _, _, report, _ = comfy.execute("DiTFastAttnCalibrate", **calibrate_inputs(wan))
    finally:
        os.umask(old)
    saved = plans_dir / "ditfastattn" / "plan_00001.json"
    assert "saved: models/ditfastattn_plans/ditfastattn/plan_00001.json" in report
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644


# ---- finding 9: combo values are validated by the nodes on every ComfyUI version --------------------
@pytest.mark.parametrize("field, value", [("window_shape", "star"), ("sampler_name", "no_such_sampler"),
                                          ("scheduler", "no_such_scheduler")])
def test_calibrate_refuses_unknown_combo_values(fa, comfy, wan, plans_dir, sampling_runs, field, value):
    node = comfy.node("DiTFastAttnCalibrate")
    inputs = calibrate_inputs(wan, **{field: value})
    verdict = validate(node, inputs)
    assert isinstance(verdict, str) and field in verdict and repr(value) in verdict
    with pytest.raises(ValueError) as info:
        comfy.execute("DiTFastAttnCalibrate", **inputs)
    assert field in str(info.value) and repr(value) in str(info.value)
    assert sampling_runs == []
    assert list(plans_dir.rglob("*.json")) == []


def test_calibrate_plan_refuses_an_unknown_window_shape(fa, wan):
    with pytest.raises(ValueError, match="window_shape.*'star'"):
        fa.calibrate(wan, POS, NEG, tiny.video_latent(), window_shape="star")


@pytest.mark.parametrize("field, value", [("sampler_name", "no_such_sampler"), ("scheduler", "no_such_scheduler")])
def test_compare_refuses_unknown_sampler_and_scheduler(fa, comfy, wan, field, value):
    node = comfy.node("DiTFastAttnCompare")
    inputs = dict(model=fa.apply(wan, fa.full_plan(wan, 4)), positive=POS, negative=NEG,
                  latent_image=tiny.video_latent(), seed=0, steps=4, cfg=2.0, sampler_name="euler",
                  scheduler="simple", denoise=1.0)
    inputs[field] = value
    verdict = validate(node, inputs)
    assert isinstance(verdict, str) and field in verdict and repr(value) in verdict
    with pytest.raises(ValueError, match=field):
        comfy.execute("DiTFastAttnCompare", **inputs)


def test_valid_inputs_pass_validation(comfy, wan):
    node = comfy.node("DiTFastAttnCalibrate")
    assert validate(node, calibrate_inputs(wan)) is True
    assert validate(node, calibrate_inputs(wan, filename_prefix="")) is True   # empty: do not save


# ---- measure_time: off by default (it synchronises the GPU on every compressed call) -----------------
def test_apply_does_not_time_attention_by_default_and_the_report_says_so(fa, comfy, wan):
    import json

    schema = comfy.node("DiTFastAttnApply").define_schema()
    assert {i.id: i for i in schema.inputs}["measure_time"].default is False
    plan = fa.full_plan(wan, 4)
    (patched,) = comfy.execute("DiTFastAttnApply", model=wan, plan=plan, enabled=True, allow_remap=False,
                               ignore_model_mismatch=False)
    samples = {"samples": fa.sample(patched, POS, NEG, tiny.video_latent())}
    text, report_json = comfy.execute("DiTFastAttnReport", model=patched, samples=samples)
    assert "attention time not measured" in text and "measure_time" in text
    data = json.loads(report_json)
    assert data["time_measured"] is False and data["measured_speedup"] is None
    assert data["full_estimate_seconds"] is None

    (timed,) = comfy.execute("DiTFastAttnApply", model=wan, plan=plan, enabled=True, allow_remap=False,
                             ignore_model_mismatch=False, measure_time=True)
    samples = {"samples": fa.sample(timed, POS, NEG, tiny.video_latent())}
    text, report_json = comfy.execute("DiTFastAttnReport", model=timed, samples=samples)
    data = json.loads(report_json)
    assert data["time_measured"] is True and data["attention_seconds"] > 0
    assert "not measured" not in text and "attention time" in text
