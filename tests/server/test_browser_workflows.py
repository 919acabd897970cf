"""Tier 3 (browser): every UI-format example workflow loads correctly in the real ComfyUI web frontend.

The frontend that the test server serves runs in Debian Chromium, driven by playwright-core
(tests/browser/check_workflows.mjs; set up with scripts/setup_browser.sh). One browser session
loads every workflow in workflows/ with ``app.loadGraphData`` and records the live graph; the tests
here compare that record with the committed files:

* every node type is registered and no "missing nodes"/"missing models" dialog appears;
* each node's widget values in the live graph equal the file's ``widgets_values`` (by position, as
  the frontend stores them) and, by widget name, the inputs of the API-format twin: values landed in
  the right widgets, not shifted;
* the API prompt the frontend builds (``app.graphToPrompt()``) equals the committed ``.api.json``
  twin: same node ids, class types, links and input values (``_meta`` ignored);
* the template browser's routes list and serve every workflow.

Without Chromium, node or playwright-core the tests are skipped with a loud reason, or fail when
``REDUCIO_REQUIRE_BROWSER=1``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from testkit.comfyui import PACK_FOLDER_NAME, REPO_ROOT
from testkit.workflows import load, ui_workflows

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "check_workflows.mjs"
CHROMIUM = Path(os.environ.get("REDUCIO_CHROMIUM", "/usr/bin/chromium"))
DRIVER_TIMEOUT_S = 900
# Nodes that exist only in the frontend (they never reach the API prompt).
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _missing_browser_tools() -> list[str]:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Chromium at {CHROMIUM}")
    if shutil.which("node") is None:
        missing.append("node (nodejs)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        missing.append("playwright-core in tests/browser/node_modules")
    return missing


@pytest.fixture(scope="session")
def browser_tools() -> None:
    missing = _missing_browser_tools()
    if missing:
        message = ("BROWSER TIER NOT RUN: missing " + ", ".join(missing)
                   + ". Install them with `bash scripts/setup_browser.sh`.")
        if os.environ.get("REDUCIO_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (REDUCIO_REQUIRE_BROWSER=1)")
        pytest.skip(message)


# -- placeholder files for combo values ----------------------------------------------------------

def _combo_options(spec: list) -> list | None:
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1].get("options", [])
    return None


def _input_spec(node_info: dict, name: str) -> list | None:
    for section in ("required", "optional"):
        spec = node_info["input"].get(section, {}).get(name)
        if spec is not None:
            return spec
    return None


def _is_upload_combo(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return any(opts.get(k) for k in ("image_upload", "video_upload", "animated_image_upload", "audio_upload"))


def _missing_combo_values(server, prompts: list[dict]) -> list[tuple[str, str, str, list]]:
    """(node class, input name, value, spec) for every combo value in the API twins that the
    server does not offer yet (model files and input files the workflows name)."""
    info = server.object_info()
    missing = []
    for prompt in prompts:
        for node in prompt.values():
            node_info = info.get(node["class_type"])
            if node_info is None:
                continue
            for name, value in node["inputs"].items():
                spec = _input_spec(node_info, name)
                options = _combo_options(spec) if spec else None
                if options is not None and isinstance(value, str) and value not in options:
                    missing.append((node["class_type"], name, value, spec))
    return missing


def _write_placeholders(server, prompts: list[dict]) -> list[Path]:
    """Create empty files with the names the workflows use, where the server lists them, so the
    combo widgets offer those names (as for a user who has downloaded the models). Returns the files
    created, to remove afterwards: other tests write real tiny models under these names."""
    created: list[Path] = []

    def create(path: Path) -> bool:
        if path.exists():
            return False
        # Folders made here stay (empty): ComfyUI's file-list cache stats every folder it listed,
        # and /object_info then fails for the nodes using one that disappeared.
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        created.append(path)
        return True

    def offered(node_class: str, name: str, value: str) -> bool:
        spec = _input_spec(server.object_info(node_class), name)
        return value in (_combo_options(spec) or [])

    model_dirs = None
    for node_class, name, value, spec in _missing_combo_values(server, prompts):
        if offered(node_class, name, value):   # an earlier placeholder already serves it
            continue
        if _is_upload_combo(spec):
            candidates = [server.input_dir]
        else:
            # Which folder feeds this combo (a model folder, or the input folder as for LoadLatent)
            # is the node's business: find it by asking the server after each try.
            if model_dirs is None:
                model_dirs = [server.models_dir / folder for folder in server.get_json("/models")]
            candidates = model_dirs + [server.input_dir]
        for directory in candidates:
            path = directory / value
            if not create(path):
                continue
            if offered(node_class, name, value):
                break
            _remove([created.pop()])
    return created


def _remove(files: list[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)


# -- the browser run -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser_run(browser_tools, comfy_server, tmp_path_factory) -> dict:
    """Runs the node driver once for all workflows; returns its JSON record."""
    workflows = ui_workflows()
    work = tmp_path_factory.mktemp("browser")
    screenshots = work / "screenshots"
    screenshots.mkdir()
    twins = [load(_api_twin(p)) for p in workflows if _api_twin(p).is_file()]
    placeholders = _write_placeholders(comfy_server, twins)
    entries = [{"name": p.name, "path": str(p)} for p in workflows]
    control = _shifted_control_workflow(workflows, work)
    if control is not None:
        entries.append({"name": control["name"], "path": control["path"], "control": True})
    config = {"url": comfy_server.url, "pack": PACK_FOLDER_NAME, "out": str(work / "result.json"),
              "screenshot_dir": str(screenshots), "user_data_dir": str(work / "chromium-profile"),
              "workflows": entries}
    (work / "config.json").write_text(json.dumps(config, indent=1))
    try:
        proc = subprocess.run(["node", str(DRIVER), str(work / "config.json")], cwd=BROWSER_DIR,
                              capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    finally:
        _remove(placeholders)
    result_path = work / "result.json"
    if not result_path.is_file():
        pytest.fail(f"browser driver wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n"
                    f"--- server log ---\n{comfy_server.log_tail(3000)}")
    result = json.loads(result_path.read_text())
    if result.get("fatal"):
        pytest.fail(f"browser driver failed: {result['fatal']}\n--- server log ---\n{comfy_server.log_tail(3000)}")
    result["placeholders"] = [str(p) for p in placeholders]
    result["control"] = control
    result["work_dir"] = str(work)
    print(f"\n[browser] {result['browser']} frontend {result['frontend_version']} ready in "
          f"{result['page_ready_s']}s; screenshots in {screenshots}; placeholder files: "
          f"{[str(p.relative_to(comfy_server.base_dir)) for p in placeholders]}")
    return result


def _shifted_control_workflow(workflows: list[Path], work: Path) -> dict | None:
    """A copy of the first workflow that has a node with two or more different widget values and an
    API twin, with that node's widgets_values rotated by one position."""
    for path in workflows:
        if not _api_twin(path).is_file():
            continue
        workflow = load(path)
        for node in workflow["nodes"]:
            values = node.get("widgets_values")
            if node["type"] in FRONTEND_ONLY_TYPES or not isinstance(values, list) or len(values) < 2 \
                    or values[1:] + values[:1] == values:
                continue
            node["widgets_values"] = values[1:] + values[:1]
            shifted = work / f"control_shifted_{path.name}"
            shifted.write_text(json.dumps(workflow, indent=1))
            return {"name": shifted.name, "path": str(shifted), "source": path, "node_id": node["id"]}
    return None


def _api_twin(ui_path: Path) -> Path:
    """`workflows/<name>.api.json`, or `workflows/api/<name>.json` should the twins move out of the
    folder the template browser lists."""
    moved = ui_path.parent / "api" / ui_path.name
    return moved if moved.is_file() else ui_path.with_name(ui_path.name[: -len(".json")] + ".api.json")


# Uncaught errors that the frontend raises by itself for every fresh user, whatever packs are
# installed: (frontend version, message, a frame that identifies the code path).
KNOWN_FRONTEND_STARTUP_ERRORS = [
    # 1.27.10: the Comfy.Canvas.NavigationMode setting's onChange sets a setting that is not
    # registered yet while CORE_SETTINGS are added (setting.id of undefined in settingStore.onChange).
    ("1.27.10", "Cannot read properties of undefined (reading 'id')", "addSetting"),
]


def _is_known_frontend_error(version: str, error: str) -> bool:
    return any(version == v and message in error and frame in error
               for v, message, frame in KNOWN_FRONTEND_STARTUP_ERRORS)


# -- comparisons ---------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _record(browser_run: dict, path: Path) -> dict:
    record = browser_run["workflows"].get(path.name)
    assert record is not None, f"{path.name}: the browser driver has no record for it"
    return record


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"node {node['id']} ({node['type']}{', ' + repr(title) if title else ''})"


def test_frontend_and_pack_loaded(browser_run):
    assert browser_run["frontend_version"], "window.__COMFYUI_FRONTEND_VERSION__ not set: page not ComfyUI?"
    assert browser_run["registered_node_type_count"] > 50
    version = browser_run["frontend_version"]
    unknown = [e for e in browser_run["page_errors"] if not _is_known_frontend_error(version, e)]
    assert not unknown, f"uncaught errors in the page at start-up (frontend {version}): {unknown}"


def test_template_routes_serve_every_workflow(browser_run):
    templates = browser_run["templates"]
    workflows = ui_workflows()
    if not workflows:
        pytest.skip("no example workflows yet")
    assert templates["listing"] is not None, f"/workflow_templates has no '{PACK_FOLDER_NAME}' entry"
    for path in workflows:
        assert path.stem in templates["listing"], \
            f"{path.name} not offered by the template browser (listing: {templates['listing']})"
        served = templates["served"][path.name]
        assert served["status"] == 200, \
            f"/api/workflow_templates/{PACK_FOLDER_NAME}/{path.name} -> HTTP {served['status']}"
        assert json.loads(served["text"]) == load(path), f"{path.name}: the served template differs from the file"


def test_template_browser_offers_only_loadable_workflows(browser_run):
    """Every entry the Templates browser shows under the pack must open as a UI-format workflow:
    the browser loads the file with app.loadGraphData, which needs `nodes`/`links`."""
    opens = browser_run["template_opens"]
    broken = {}
    for name, opened in sorted(opens.items()):
        ui_file = REPO_ROOT / "workflows" / f"{name}.json"
        expected_nodes = len(load(ui_file).get("nodes", [])) if ui_file.is_file() else 0
        if opened["error"] or opened["dialogs"] or opened["page_errors"] or not expected_nodes or opened["node_count"] != expected_nodes:
            broken[name] = opened
    assert not broken, (
        f"{len(broken)} of the {len(opens)} entries the Templates browser lists under '{PACK_FOLDER_NAME}' do "
        f"not open as a workflow (node count, error, dialogs): {broken}. ComfyUI lists every *.json in "
        "workflows/, so API-format twins (*.api.json) show up as templates too; keep them in a folder "
        "the non-recursive template scan does not read (e.g. workflows/api/).")


def test_template_browser_dialog_shows_the_pack(browser_run):
    seen = browser_run["template_browser"]
    assert seen["pack_section"], f"no '{PACK_FOLDER_NAME}' section to click: {seen.get('click_error')}"
    assert not seen["page_errors"], f"uncaught errors in the page while browsing templates: {seen['page_errors']}"
    for path in ui_workflows():
        assert path.stem in seen["text"], f"{path.stem} is not shown in the pack's Templates section: {seen['text']}"


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_workflow_loads_without_missing_nodes(browser_run, path):
    record = _record(browser_run, path)
    assert not record["unregistered"], \
        f"{path.name}: node types not registered in the frontend: {record['unregistered']}"
    assert record["load_error"] is None, f"{path.name}: app.loadGraphData raised: {record['load_error']}"
    assert not record["dialogs"], f"{path.name}: the frontend showed a dialog after loading: {record['dialogs']}"
    assert not record["page_errors"], f"{path.name}: uncaught errors in the page while loading: {record['page_errors']}"
    errors = [n for n in record["nodes"] if n["has_errors"]]
    assert not errors, f"{path.name}: nodes flagged with errors: {[_node_label(n) for n in errors]}"
    file_nodes = load(path)["nodes"]
    assert sorted((n["id"], n["type"]) for n in record["nodes"]) == \
        sorted((n["id"], n["type"]) for n in file_nodes), f"{path.name}: the live graph has other nodes"


def _widget_problems(name: str, workflow: dict, twin: dict, twin_name: str, record: dict) -> list[str]:
    live = {n["id"]: n for n in record["nodes"]}
    serialized = {n["id"]: n for n in record["serialized"]["nodes"]}
    problems = []
    for node in workflow["nodes"]:
        expected = node.get("widgets_values")
        if expected is None or node["type"] in FRONTEND_ONLY_TYPES:
            continue
        label = f"{name} {_node_label(node)}"
        # 1. Position: what the frontend saves back equals the file.
        got = serialized.get(node["id"], {}).get("widgets_values")
        if isinstance(expected, list) and not _same(got, expected):
            problems.append(f"{label}: widgets_values in the file {expected}, after loading {got}")
        # 2. Names: each named widget holds the value the API twin gives that input (a value stored
        #    at the wrong position survives step 1 unchanged, but lands in the wrong widget here).
        api_inputs = twin.get(str(node["id"]), {}).get("inputs", {})
        for widget in live.get(node["id"], {}).get("widgets", []):
            if widget["name"] not in api_inputs or isinstance(api_inputs[widget["name"]], list):
                continue   # frontend-only widget (upload button, control_after_generate) or linked input
            want = api_inputs[widget["name"]]
            if not _same(widget["value"], want):
                problems.append(f"{label}: widget '{widget['name']}' holds {widget['value']!r} after loading, "
                                f"the API twin {twin_name} says {want!r}")
            if widget["options"] is not None and widget["value"] not in widget["options"]:
                problems.append(f"{label}: combo '{widget['name']}' value {widget['value']!r} is not among "
                                f"its options {widget['options'][:20]}")
    return problems


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_widget_values_land_in_the_right_widgets(browser_run, path):
    twin = load(_api_twin(path)) if _api_twin(path).is_file() else {}
    problems = _widget_problems(path.name, load(path), twin, _api_twin(path).name, _record(browser_run, path))
    assert not problems, "\n".join(problems)


def test_shifted_widget_values_are_detected(browser_run):
    """Control: a copy of a real workflow whose widget values were rotated by one position (what
    inserting a widget input into a published node does to saved files) must be caught."""
    control = browser_run.get("control")
    if control is None:
        pytest.skip("no workflow with a node of two or more different widget values to shift")
    record = browser_run["workflows"][control["name"]]
    source = control["source"]
    problems = _widget_problems(control["name"], json.loads(Path(control["path"]).read_text()),
                                load(_api_twin(source)), _api_twin(source).name, record)
    assert any(f"node {control['node_id']} " in p for p in problems), \
        f"rotating node {control['node_id']}'s widgets_values in {source.name} went unnoticed: {problems}"
    assert _prompt_differences(control["name"], record["prompt"], load(_api_twin(source)))


def _prompt_differences(name: str, built: dict, committed: dict) -> list[str]:
    problems = []
    if built.keys() != committed.keys():
        problems.append(f"{name}: node ids differ: frontend {sorted(built)}, committed {sorted(committed)}")
    for node_id in sorted(built.keys() & committed.keys(), key=str):
        got, want = built[node_id], committed[node_id]
        label = f"{name} node {node_id} ({want['class_type']})"
        if got["class_type"] != want["class_type"]:
            problems.append(f"{label}: frontend builds class_type {got['class_type']}")
            continue
        for key in sorted(got["inputs"].keys() | want["inputs"].keys()):
            if key not in want["inputs"]:
                problems.append(f"{label}: the frontend sends input '{key}'={got['inputs'][key]!r}, "
                                "missing in the committed API twin")
            elif key not in got["inputs"]:
                problems.append(f"{label}: the committed API twin has input '{key}'={want['inputs'][key]!r}, "
                                "the frontend does not send it")
            elif not _same(got["inputs"][key], want["inputs"][key]):
                problems.append(f"{label}: input '{key}' is {got['inputs'][key]!r} from the frontend, "
                                f"{want['inputs'][key]!r} in the committed API twin")
    return problems


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_frontend_prompt_equals_api_twin(browser_run, path):
    twin_path = _api_twin(path)
    if not twin_path.is_file():
        pytest.fail(f"{path.name} has no API-format twin {twin_path.name}")
    record = _record(browser_run, path)
    assert record["prompt_error"] is None, f"{path.name}: app.graphToPrompt raised: {record['prompt_error']}"
    problems = _prompt_differences(twin_path.name, record["prompt"], load(twin_path))
    assert not problems, "\n".join(problems)


OVERLAP_TOLERANCE_PX = 8   # touching edges and rounding are fine; a hidden title bar or widget is not


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_nodes_do_not_overlap(browser_run, path):
    """Nodes as the frontend draws them (title bar included, after it grew nodes to fit their widgets)
    must not cover each other: an example workflow is read on screen."""
    record = _record(browser_run, path)
    in_file = {n["id"]: n for n in load(path)["nodes"]}
    nodes = record["nodes"]
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["bounds"]
            bx, by, bw, bh = b["bounds"]
            overlap_x = min(ax + aw, bx + bw) - max(ax, bx)
            overlap_y = min(ay + ah, by + bh) - max(ay, by)
            if overlap_x > OVERLAP_TOLERANCE_PX and overlap_y > OVERLAP_TOLERANCE_PX:
                detail = "; ".join(
                    f"{_node_label(n)} at pos {in_file.get(n['id'], {}).get('pos')} size in file "
                    f"{in_file.get(n['id'], {}).get('size')}, drawn {[round(v) for v in n['bounds'][2:]]} "
                    "(with title bar)" for n in (a, b))
                problems.append(f"{path.name}: nodes {a['id']} and {b['id']} overlap by {round(overlap_x)} x "
                                f"{round(overlap_y)} px in the web UI: {detail}")
    assert not problems, "\n".join(problems) + (
        "\nMove the nodes apart in the file (the frontend widens a node to fit its widgets, and draws a "
        f"{browser_run.get('title_height', 30)} px title bar above `pos`).")
