"""Tier 3: the DiTFastAttn example workflows through a real headless ComfyUI server.

Stand-ins: a tiny random Cosmos-Predict2 DiT saved under the real checkpoint's file name in the
server's models/diffusion_models (stock UNETLoader detects it from the key names and shapes), and
core's LotusConditioning node as the text conditioning (width 1024, as Cosmos-Predict2's text
encoder; no text encoder file needed). Wan / Flux / SD3 stand-ins cannot be fed this way: their
loaders fix the text width at 4096 or need a pooled vector no core node produces without a text
encoder (see docs/ditfastattn_nodes.md). The workflows run with small test overrides (steps, size),
in the style of nunchaku's test cases.
"""
import copy
import json
import os
import re
from pathlib import Path

import pytest

from testkit.fastattn_ui_format import api_to_ui  # noqa: E402
from testkit.workflows import COMMON_OVERRIDES, FASTATTN_MODEL_FILE, OVERRIDES, api_workflows, load, ui_twin  # noqa: E402

pytestmark = pytest.mark.server

WORKFLOWS = api_workflows("ditfastattn_")


@pytest.fixture(scope="module")
def server_with_model(comfy_server, comfy):
    from testkit import fastattn_tiny as tiny

    folder = comfy_server.models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    tiny.write_diffusion_model_file(tiny.tiny_cosmos_predict2(seed=0), folder / FASTATTN_MODEL_FILE)
    return comfy_server


def with_overrides(path: Path) -> dict:
    prompt = copy.deepcopy(load(path))
    stem = path.stem
    for overrides in (COMMON_OVERRIDES, OVERRIDES[stem]):
        for node_id, values in overrides.items():
            prompt[node_id]["inputs"].update(values)
    return prompt


def history_text(entry: dict, node_id: str) -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_ui_twin_is_the_same_graph(comfy_server, path):
    generated = api_to_ui(load(path), comfy_server.object_info())
    if os.environ.get("REGENERATE_UI_TWINS") == "1":     # after editing an API workflow or the layout rules
        ui_twin(path).write_text(json.dumps(generated, indent=1) + "\n")
    assert json.loads(ui_twin(path).read_text()) == generated, \
        (f"{ui_twin(path).name} is out of date: regenerate it from {path.name} with REGENERATE_UI_TWINS=1 "
         f"~/comfy/ComfyUI/venv/bin/python -m pytest tests/server/test_fastattn_workflows.py -k ui_twin")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_calibrate_then_apply_workflow_runs(server_with_model, path):
    server = server_with_model
    entry = server.run_prompt(with_overrides(path), timeout=900)
    files = server.output_files(entry)
    assert any(f.suffix == ".latent" for f in files), files
    assert any(f.suffix == ".png" and "method_map" in f.name for f in files), files
    report = history_text(entry, "8")
    assert "DiTFastAttn (cosmos_predict2" in report and "attention FLOPs kept" in report, report
    # the plan landed in models/ditfastattn_plans and is a valid plan for this run
    prefix = with_overrides(path)["5"]["inputs"]["filename_prefix"].split("/")[-1]
    plans = sorted((server.models_dir / "ditfastattn_plans" / "ditfastattn").glob(f"{prefix}_[0-9]*.json"))
    assert plans, "the calibrate node did not save its plan"
    plan = json.loads(plans[-1].read_text())
    assert plan["format"] == "ditfastattn-plan"
    assert plan["metadata"]["architecture"] == "cosmos_predict2" and plan["metadata"]["num_steps"] == 3
    grid = plan["metadata"]["token_grid"]
    assert grid == ([3, 4, 4] if "video" in path.name else [1, 4, 4])
    if "v2" in path.name:
        # V2 head-wise under an "attention FLOPs kept" budget, which the accelerated run keeps
        assert plan["granularity"] == "head" and plan["metadata"]["extra"]["v2_budget"] == "flops_kept"
        kept = float(re.search(r"attention FLOPs kept ([0-9.]+)%", report).group(1))
        assert kept <= 100 * plan["metadata"]["extra"]["v2_flops_kept"] + 0.05, report
    else:
        assert plan["granularity"] == "layer"


def test_saved_plan_reused_from_file_and_embedded_json(server_with_model):
    """A second graph loads the saved plan (from the plans folder, and as embedded JSON) and
    reproduces the first graph's accelerated latent bit for bit; a wrong step count is refused."""
    server = server_with_model
    path = next(p for p in WORKFLOWS if "image" in p.name)
    first = with_overrides(path)
    first["11"]["inputs"]["filename_prefix"] = "ditfastattn/reuse_test"
    entry = server.run_prompt(first, timeout=900)
    reference = next(f for f in server.output_files(entry) if f.suffix == ".latent").read_bytes()
    saved = sorted((server.models_dir / "ditfastattn_plans" / "ditfastattn").glob("reuse_test_*.json"))[-1]
    plan_json = saved.read_text()

    for loader_inputs in ({"plan_name": f"ditfastattn/{saved.name}", "plan_json": ""},
                          {"plan_name": "(use plan_json)", "plan_json": plan_json}):
        second = {k: v for k, v in copy.deepcopy(first).items() if k in ("1", "2", "3", "4", "7", "9")}
        second["20"] = {"class_type": "DiTFastAttnLoadPlan", "inputs": loader_inputs}
        second["21"] = {"class_type": "DiTFastAttnApply", "inputs": {
            "model": ["1", 0], "plan": ["20", 0], "enabled": True, "allow_remap": False,
            "ignore_model_mismatch": False, "measure_time": True}}
        second["7"]["inputs"]["model"] = ["21", 0]
        second["9"]["inputs"]["filename_prefix"] = "latents/reuse"
        out = server.run_prompt(second, timeout=600)
        latent = next(f for f in server.output_files(out) if f.suffix == ".latent")
        # SaveLatent embeds the prompt in the file's metadata; compare the tensor bytes only
        assert _latent_tensor(latent.read_bytes()) == _latent_tensor(reference)

    second["7"]["inputs"]["steps"] = 5
    from testkit.server import PromptFailed

    with pytest.raises(PromptFailed, match="steps"):
        server.run_prompt(second, timeout=600)


def _latent_tensor(raw: bytes) -> bytes:
    import safetensors.torch

    return safetensors.torch.load(raw)["latent_tensor"].numpy().tobytes()
