"""Plan format: JSON and official round trips, golden plans, validation, mismatch handling."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from fastattn.plan import (AST, ASC, FULL, PLAN_METHODS, WA_NO_RESIDUAL, WARS, WARS_ASC,
                           FORMAT_NAME, MAX_STEPS, Plan, PlanFormatError, PlanMetadata,
                           PlanMismatchError, RunSignature, weights_fingerprint)

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
THRESHOLDS = ("0.005", "0.025", "0.075", "0.15")


def _meta(**kw):
    base = dict(num_steps=4, num_layers=2, num_heads=4, architecture="DiTTransformer2DModel",
                weights_fingerprint="sha256:abc", token_grid=(8, 8), sampler="dpmsolver++",
                sigmas=(14.6, 5.0, 1.2, 0.1), cfg_scale=4.0, cond_first=True, threshold=0.05,
                window=(8, 8), candidates=(AST, WARS_ASC, WARS, ASC), metric="official",
                calibration_inputs=2)
    base.update(kw)
    return PlanMetadata(**base)


def _plan(**kw):
    methods = [[FULL, FULL], [AST, WARS], [WARS_ASC, ASC], [AST, WA_NO_RESIDUAL]]
    return Plan(methods, _meta(**kw))


def _signature(**kw):
    base = dict(num_layers=2, num_heads=4, architecture="DiTTransformer2DModel",
                weights_fingerprint="sha256:abc", token_grid=(8, 8), num_steps=4,
                sampler="dpmsolver++", sigmas=(14.6, 5.0, 1.2, 0.1), cfg_scale=4.0)
    base.update(kw)
    return RunSignature(**base)


# ---- round trips -------------------------------------------------------------------------

def test_json_round_trip_keeps_everything():
    plan = _plan()
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.metadata.token_grid == (8, 8) and again.metadata.window == (8, 8)
    data = json.loads(text)
    assert data["format"] == FORMAT_NAME and data["version"] == 1
    assert data["methods"][1] == [AST, WARS]


def test_save_load_is_real_json(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "p.json")
    assert json.loads(path.read_text())["granularity"] == "layer"
    assert Plan.load(path) == plan
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_official_round_trip():
    plan = _plan()
    official = plan.to_official()
    assert official[1] == {"attn1": [FULL, WARS, ASC, WA_NO_RESIDUAL], "attn2": None, "ff": None}
    again = Plan.from_official(official, plan.metadata)
    assert again == plan


@pytest.mark.parametrize("thr", THRESHOLDS)
def test_golden_official_plans_import(thr):
    raw = json.loads((GOLDEN / f"calib_dit_thr{thr}_plan.json").read_text())
    plan = Plan.from_official(raw)
    assert plan.num_layers == 4 and plan.num_steps == 10
    assert plan.to_official() == raw["blocks"]
    assert Plan.load(GOLDEN / f"calib_dit_thr{thr}_plan.json") == plan  # detected by shape
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    assert plan.method_counts() == manifest["calib_dit"]["runs"][thr]["method_counts"]


def test_load_official_torch_save_safely(tmp_path):
    raw = json.loads((GOLDEN / "calib_dit_thr0.15_plan.json").read_text())["blocks"]
    path = tmp_path / "DiT_10_2_0.15.json"  # the official cache: torch.save under a .json name
    torch.save(raw, path)
    with pytest.raises(PlanFormatError, match="pickle"):
        Plan.load(path)
    assert Plan.load_official_file(path).to_official() == raw


def test_load_refuses_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.json"
    path.write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(PlanFormatError):
        Plan.load(path)
    with pytest.raises(PlanFormatError, match="safe loader"):
        Plan.load_official_file(path)
    assert not marker.exists()


def test_head_wise_plan_round_trip_and_no_official_form():
    methods = [[[FULL] * 3, [FULL] * 3], [[AST, WARS, FULL], [ASC, AST, AST]]]
    plan = Plan(methods, {"num_heads": 3}, granularity="head")
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.method(1, 0, 1) == WARS
    assert plan.method_counts()[AST] == 3
    with pytest.raises(Exception, match="head-wise"):
        plan.to_official()


# ---- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("not json", "not valid JSON"),
    ("[" * 10000 + "]" * 10000, "nested"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [[NaN]]}', "NaN"),
    ('{"format": "x"}', "format"),
    ('{"format": "ditfastattn-plan", "version": 99, "methods": [["full_attn"]]}', "newer"),
    ('{"format": "ditfastattn-plan", "version": "1", "methods": [["full_attn"]]}', "version"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["rm -rf"]]}', "unknown method"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [[1]]}', "must be a string"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": []}', "no steps"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"], []]}', "layers"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["output_share"]]}',
     "no earlier step"),
    ('{"format": "ditfastattn-plan", "version": 1, '
     '"methods": [["output_share"]], "methods": [["full_attn"]]}', "duplicate"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]], "x": 1}',
     "unknown keys"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]],'
     ' "metadata": {"evil": 1}}', "unknown keys"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]],'
     ' "metadata": {"num_steps": 3}}', "num_steps"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]],'
     ' "metadata": {"cfg_scale": "4"}}', "cfg_scale"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]],'
     ' "metadata": {"window": [8, -1]}}', "window"),
    ('{"format": "ditfastattn-plan", "version": 1, "methods": [["full_attn"]],'
     ' "metadata": {"sigmas": [1.0, 2.0]}}', "sigmas"),
    ('[{"attn1": ["full_attn"]}]', "official"),
    # regression: Python's int-digit limit used to escape as a bare ValueError
    ('{"format": "ditfastattn-plan", "version": ' + "1" * 5000 + "}", "thousands of digits"),
])
def test_hostile_text_is_refused_clearly(text, match):
    with pytest.raises(PlanFormatError, match=match):
        Plan.from_json(text)


def test_huge_step_count_refused_before_work():
    text = json.dumps({"format": FORMAT_NAME, "version": 1,
                       "methods": [["full_attn"]] * (MAX_STEPS + 1)})
    with pytest.raises(PlanFormatError, match="limit"):
        Plan.from_json(text)


def test_non_utf8_and_wrong_type_input():
    with pytest.raises(PlanFormatError, match="UTF-8"):
        Plan.from_json(b"\xff\xfe\x00junk")
    with pytest.raises(PlanFormatError, match="expected JSON text"):
        Plan.from_json(12)  # type: ignore[arg-type]


def test_wars_needs_an_earlier_full_step():
    with pytest.raises(PlanFormatError, match="residual"):
        Plan([[WA_NO_RESIDUAL], [WARS]])
    Plan([[WA_NO_RESIDUAL], [ASC], [WARS]])  # an ASC full step provides the residual


def test_official_import_validation():
    with pytest.raises(PlanFormatError, match="attn2"):
        Plan.from_official([{"attn1": [FULL], "attn2": [FULL], "ff": None}])
    with pytest.raises(PlanFormatError, match="steps"):
        Plan.from_official([{"attn1": [FULL, AST]}, {"attn1": [FULL]}])
    with pytest.raises(PlanFormatError, match="unknown method"):
        Plan.from_official([{"attn1": [FULL, "__import__('os')"]}])


def test_schema_file_matches_code():
    from fastattn.plan.schema import SCHEMA_PATH, schema_text

    # the shipped file is generated from the code's declaration (python -m fastattn.plan.schema)
    assert SCHEMA_PATH.read_text() == schema_text()
    schema = json.loads((Path(__file__).resolve().parents[2] / "fastattn" / "plan" /
                         "schema.json").read_text())
    assert schema["properties"]["format"]["const"] == FORMAT_NAME
    assert tuple(schema["$defs"]["method"]["enum"]) == PLAN_METHODS
    meta_keys = set(schema["properties"]["metadata"]["properties"])
    assert meta_keys == set(PlanMetadata(num_steps=1, num_layers=1).to_dict())


# ---- mismatch handling -------------------------------------------------------------------

def test_matching_run_returns_same_plan():
    plan = _plan()
    assert plan.check(_signature()) is plan


@pytest.mark.parametrize("change, words", [
    (dict(num_layers=3), "layers"),
    (dict(num_heads=8), "heads"),
    (dict(architecture="PixArtTransformer2DModel"), "architecture"),
    (dict(weights_fingerprint="sha256:def"), "weights"),
    (dict(token_grid=(16, 16)), "token grid"),
    (dict(cfg_scale=7.0), "CFG"),
    (dict(num_steps=8, sigmas=None), "steps"),
    (dict(sigmas=(14.6, 6.0, 1.2, 0.1)), "sigma"),
])
def test_mismatch_refused_with_reason_and_fix(change, words):
    with pytest.raises(PlanMismatchError, match=words) as info:
        _plan().check(_signature(**change))
    assert "How to fix" in str(info.value) and info.value.fixes


def test_structural_mismatch_cannot_be_waived():
    with pytest.raises(PlanMismatchError):
        _plan().check(_signature(num_layers=3), allow_remap=True,
                      ignore=["architecture", "weights_fingerprint", "token_grid", "cfg_scale"])
    with pytest.raises(ValueError, match="cannot ignore"):
        _plan().check(_signature(), ignore=["num_layers"])


def test_ignore_waives_and_notes():
    plan = _plan().check(_signature(cfg_scale=7.0), ignore=["cfg_scale"])
    assert plan.methods == _plan().methods
    assert any("CFG" in n for n in plan.metadata.notes)


def test_remap_by_sigma_position():
    plan = _plan()
    run = _signature(num_steps=7, sigmas=(14.6, 9.0, 5.0, 2.5, 1.2, 0.5, 0.1), sampler="euler")
    remapped = plan.check(run, allow_remap=True)
    assert remapped.num_steps == 7
    # nearest log-sigma: 9 is closer to 14.6 than to 5, 2.5 closer to 5 than to 1.2, ...
    expected = [0, 0, 1, 1, 2, 2, 3]
    assert list(remapped.methods) == [plan.methods[i] for i in expected]
    assert f"step map {expected}" in " ".join(remapped.metadata.notes)
    assert remapped.metadata.sigmas == run.sigmas and remapped.metadata.sampler == "euler"
    assert any("remapped 4 planned steps onto 7" in n for n in remapped.metadata.notes)


def test_remap_forces_first_step_full():
    plan = _plan()
    run = _signature(num_steps=2, sigmas=(5.0, 0.1))  # first run step maps to plan step 1
    remapped = plan.check(run, allow_remap=True)
    assert remapped.methods[0] == (FULL, FULL)
    assert any("forced" in n for n in remapped.metadata.notes)


def test_remap_without_sigmas_uses_grid_position():
    plan = Plan([[FULL], [AST], [WARS], [AST]], {"num_steps": 4})
    remapped = plan.check(RunSignature(num_steps=7), allow_remap=True)
    assert [r[0] for r in remapped.methods] == [FULL, AST, AST, WARS, WARS, AST, AST]


# ---- fingerprint -------------------------------------------------------------------------

def test_weights_fingerprint_detects_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    first = weights_fingerprint(model.state_dict().items())
    assert first == weights_fingerprint(model.state_dict().items())
    with torch.no_grad():
        model[1].weight[0, 0] += 1
    assert weights_fingerprint(model.state_dict().items()) != first
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert weights_fingerprint(bf16.items()).startswith("sha256:")


def test_all_plan_methods_are_official_strings():
    assert set(PLAN_METHODS) == {"full_attn", "output_share", "residual_window_attn",
                                 "full_attn+cfg_attn_share",
                                 "residual_window_attn+cfg_attn_share",
                                 "residual_window_attn+without_residual"}


# ---- seeded property tests ---------------------------------------------------------------

def _random_plan(rng):
    """A random valid layer-wise plan (rng: random.Random): step 0 full, then anything."""
    steps, layers = rng.randint(1, 12), rng.randint(1, 6)
    rows = [[FULL] * layers]
    for _ in range(steps - 1):
        rows.append([rng.choice(PLAN_METHODS) for _ in range(layers)])
    meta = {"threshold": rng.random(), "window": [rng.randint(0, 64), rng.randint(0, 64)],
            "sigmas": sorted((rng.uniform(0.01, 100) for _ in range(steps)), reverse=True),
            "cfg_scale": rng.choice([None, 1.0, 4.5]), "token_grid": [rng.randint(1, 64)] * 2,
            "extra": {"k": [rng.randint(0, 9)], "s": "x" * rng.randint(0, 20)}}
    return Plan(rows, meta)


def test_property_random_plans_round_trip():
    import random

    rng = random.Random(1234)
    for _ in range(300):
        plan = _random_plan(rng)
        assert Plan.from_json(plan.to_json()) == plan
        assert Plan.from_json(plan.to_json(indent=2)) == plan
        official = Plan.from_official(plan.to_official(), plan.metadata)
        assert official == plan
        counts = plan.method_counts()
        assert sum(counts.values()) == plan.num_steps * plan.num_layers


def _mutate(rng, value, depth=0):
    """Replace one random node of a JSON tree by junk of another type."""
    junk = [None, True, -1, 10 ** 12, 1.5, "", "full_attn", [], {}, [[[]]], {"a": {"b": []}},
            "x" * 5000, [FULL] * 3]
    if depth > 6 or not isinstance(value, (dict, list)) or not value or rng.random() < 0.25:
        return rng.choice(junk)
    if isinstance(value, dict):
        key = rng.choice(sorted(value))
        out = dict(value)
        if rng.random() < 0.1:
            out.pop(key)
        else:
            out[key] = _mutate(rng, value[key], depth + 1)
        return out
    index = rng.randrange(len(value))
    out = list(value)
    out[index] = _mutate(rng, value[index], depth + 1)
    return out


def test_property_mutated_documents_fail_cleanly():
    """Any corrupted plan either still parses to a valid plan or raises PlanFormatError;
    never another exception type."""
    import random

    rng = random.Random(99)
    outcomes = {"valid": 0, "refused": 0}
    for _ in range(600):
        doc = _mutate(rng, _random_plan(rng).to_dict())
        text = json.dumps(doc)
        if rng.random() < 0.3:  # also byte-level damage
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + rng.choice(["", "}", "]", "\x00", "\\", '"', "NaN"]) + text[cut:]
        try:
            Plan.from_json(text)
            outcomes["valid"] += 1
        except PlanFormatError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 300  # most mutations must be caught


def test_load_refuses_oversized_and_missing_files(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:  # sparse: no 33 MB actually written
        handle.truncate(33 * 1024 * 1024)
    with pytest.raises(PlanFormatError, match="limit"):
        Plan.load(big)
    with pytest.raises(FileNotFoundError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path)  # a folder is not a plan file


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("previous content")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("fastattn.plan.format.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _plan().save(target)
    assert target.read_text() == "previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_saved_plan_gets_the_umask_mode_like_other_outputs(tmp_path):
    """Plans are ordinary output files: readable by others per the umask (not mkstemp's 0600)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = _plan().save(tmp_path / "plan.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        private = _plan().save(tmp_path / "private.json")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert Plan.load(path) == _plan()


# ---- the extra facts the ComfyUI nodes rely on --------------------------------------------

@pytest.mark.parametrize("extra, words", [
    ({"window_fraction": "wide"}, ["metadata.extra.window_fraction", "number", "str"]),
    ({"window_fraction": 0.0}, ["metadata.extra.window_fraction", "(0, 1]"]),
    ({"window_fraction": 3}, ["metadata.extra.window_fraction", "(0, 1]"]),
    ({"window_shape": "star"}, ["metadata.extra.window_shape", "'star'", "'1d'", "'grid'"]),
    ({"window_shape": 1}, ["metadata.extra.window_shape", "string"]),
    ({"schedule": 5}, ["metadata.extra.schedule", "list"]),
    ({"schedule": [1.0, "x"]}, ["metadata.extra.schedule[1]", "number"]),
    ({"schedule": [1.0]}, ["metadata.extra.schedule", "at least 2"]),
    ({"schedule": [1.0, -0.5]}, ["metadata.extra.schedule", ">= 0"]),
    ({"sampling_steps": "ten"}, ["metadata.extra.sampling_steps", "integer"]),
    ({"sampling_steps": 0}, ["metadata.extra.sampling_steps", "outside"]),
    ({"schedule": [3.0, 2.0, 1.0, 0.0], "sampling_steps": 5},
     ["metadata.extra.sampling_steps", "5", "schedule", "3 steps"]),
])
def test_extra_values_the_nodes_use_are_validated_at_load(extra, words):
    with pytest.raises(PlanFormatError) as info:
        _plan(extra=extra)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    # the same document as text fails the same way (what Load Plan and plan files see)
    document = _plan().to_dict()
    document["metadata"]["extra"] = extra
    with pytest.raises(PlanFormatError, match="metadata.extra"):
        Plan.from_dict(document)


def test_valid_extra_values_and_unknown_extra_keys_still_load():
    extra = {"window_fraction": 0.25, "window_shape": "grid", "schedule": [14.6, 5.0, 1.2, 0.1, 0.0],
             "sampling_steps": 4, "scheduler": "simple", "tool_specific": {"anything": [1, "a"]}}
    plan = _plan(extra=extra)
    assert Plan.from_json(plan.to_json()).metadata.extra == extra
    assert _plan(extra={"window_fraction": 1}).metadata.extra["window_fraction"] == 1
