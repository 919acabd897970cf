"""Tier 3: a real headless ComfyUI server loads the pack; generic checks of every example workflow.

Feature-specific tests (running each API workflow with tiny models) live in
tests/server/test_<feature>_*.py; these checks hold for every workflow in workflows/.
"""
import pytest
from testkit.comfyui import PACK_FOLDER_NAME
from testkit.workflows import api_workflows, load, ui_twin, ui_workflows


def test_pack_nodes_served(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module", "").endswith(PACK_FOLDER_NAME)}
    assert "IMPORT FAILED" not in comfy_server.log_tail(100000)
    for node_id in ours:
        assert node_id.startswith(("Reducio", "DiTFastAttn")), node_id
    # Core nodes the example workflows rely on are present.
    for core in ("KSampler", "SaveImage"):
        assert core in info


def test_bad_prompt_is_rejected_with_node_errors(comfy_server):
    status, payload = comfy_server.post_prompt(
        {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
         "2": {"class_type": "EmptyImage", "inputs": {"width": "not a number", "height": 64,
                                                      "batch_size": 1, "color": 0}}})
    assert status == 400
    assert "node_errors" in payload and payload["node_errors"]


def test_workflow_templates_listed(comfy_server):
    if not ui_workflows():
        pytest.skip("no example workflows yet")
    templates = comfy_server.get_json("/workflow_templates")
    listed = set(templates.get(PACK_FOLDER_NAME, []))
    for path in ui_workflows():
        assert path.stem in listed, f"{path.name} not offered in the template browser: {templates}"


def _widget_inputs(node_info: dict) -> list[str]:
    """Names of a node's inputs that the frontend shows as widgets, in order."""
    names = []
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    order = node_info.get("input_order")
    if order:
        flat = order.get("required", []) + order.get("optional", [])
        names.sort(key=lambda n: flat.index(n) if n in flat else len(flat))
    return names


def _expected_widget_count(node_info: dict, names: list[str]) -> int:
    count = 0
    for name in names:
        spec = node_info["input"].get("required", {}).get(name) or node_info["input"]["optional"][name]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        count += 1
        # The frontend appends a "control after generate" value after seed-like INT widgets.
        if spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
            count += 1
        # Upload-capable combos (LoadImage, LoadVideo) serialise their upload widget too.
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("animated_image_upload"):
            count += 1
    return count


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_ui_workflow_matches_node_definitions(comfy_server, path):
    """A UI-format workflow loads with correct widget values only if each node's widgets_values
    lines up with the node's widget inputs (they are stored by position)."""
    info = comfy_server.object_info()
    workflow = load(path)
    assert path.name.replace(".json", "").replace("-", "").replace("_", "").replace(".", "").isalnum()
    node_ids = {n["id"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            continue
        assert node["type"] in info, f"{path.name}: unknown node type {node['type']}"
        names = _widget_inputs(info[node["type"]])
        # Widgets converted to sockets (linked) still keep their value slot in widgets_values.
        expected = _expected_widget_count(info[node["type"]], names)
        got = len(node.get("widgets_values") or [])
        assert got == expected, (f"{path.name}: node {node['id']} ({node['type']}) has {got} widget values, "
                                 f"its definition has {expected} ({names})")
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, _type = link[:6]
        assert src in node_ids and dst in node_ids, f"{path.name}: link {link_id} points at a missing node"


@pytest.mark.parametrize("path", api_workflows(), ids=lambda p: p.name)
def test_api_workflow_has_ui_twin_and_valid_nodes(comfy_server, path):
    info = comfy_server.object_info()
    prompt = load(path)
    assert ui_twin(path).is_file(), f"{path.name} has no UI-format twin {ui_twin(path).name}"
    ui_types = sorted(n["type"] for n in load(ui_twin(path))["nodes"]
                      if n["type"] not in ("Note", "MarkdownNote", "Reroute"))
    assert sorted(n["class_type"] for n in prompt.values()) == ui_types, \
        f"{path.name} and its UI twin use different nodes"
    for node_id, node in prompt.items():
        assert node["class_type"] in info, f"{path.name}: node {node_id} has unknown type {node['class_type']}"
