"""Tier 3: the Reducio VAE example workflows through a real headless ComfyUI server.

Every ``workflows/api/reducio_vae_*.json`` is POSTed to /prompt as shipped; the tiny golden Reducio
VAE (official key layout, config in the safetensors metadata, as the converter writes it) is saved
under the file name the workflows use, and a short test video is written into the input folder.
Outputs are checked by decoding the files the server wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
from testkit.comfyui import PACK_FOLDER_NAME
from testkit.workflows import VIDEO_NAME, api_workflows, load, ui_twin, write_test_video

MODEL_NAME = "reducio-ft4-fs32-attn23.safetensors"
VIDEO_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH = 24, 36, 44     # 24 frames -> padded to 2 clips of 16
PADDED_FRAMES = 32
OUR_NODES = ("ReducioVAELoader", "ReducioVAEEncode", "ReducioVAEDecode")
WORKFLOWS = {p.name: p for p in api_workflows("reducio_vae_")}


def read_video(path: Path) -> tuple[int, int, int, Fraction]:
    """(frame count, height, width, frame rate) of a video file, by decoding every frame."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)]
        return len(frames), frames[0].height, frames[0].width, stream.average_rate


@pytest.fixture(scope="module")
def server(comfy_server, golden_dir):
    """The shared test server with the tiny Reducio VAE and the example video in place."""
    from safetensors.torch import load_file, save_file

    base = golden_dir / "reducio"
    config = json.loads((base / "tiny_config.json").read_text())["constructor_kwargs"]
    folder = comfy_server.models_dir / "reducio"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(base / "tiny_weights.safetensors")), str(folder / MODEL_NAME),
              metadata={"reducio_config": json.dumps(config), "format": "pt"})
    write_test_video(comfy_server.input_dir / VIDEO_NAME, VIDEO_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH)
    return comfy_server


def outputs_of(server, entry: dict, node_id: str) -> list[Path]:
    return server.output_files({"outputs": {node_id: entry["outputs"].get(node_id, {})}})


def test_reducio_workflows_are_shipped():
    assert set(WORKFLOWS) == {"reducio_vae_roundtrip.json", "reducio_vae_encode_to_latent.json",
                              "reducio_vae_decode_from_latent.json"}


# ------------------------------------------------------------------------------------- node definitions
def test_object_info_shows_the_nodes_with_tooltips(server):
    info = server.object_info()
    for node_id in OUR_NODES:
        node = info[node_id]
        assert node["python_module"].endswith(PACK_FOLDER_NAME)
        assert node["category"].startswith("Reducio")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node["output_tooltips"] and all(node["output_tooltips"]), node_id
    assert info["ReducioVAEEncode"]["output"] == ["LATENT", "IMAGE"]
    assert info["ReducioVAEDecode"]["input_order"]["required"] == ["vae", "motion_latent", "content", "tiling"]
    assert info["ReducioVAELoader"]["output"] == ["REDUCIO_VAE"]
    # The checkpoint list is read from models/reducio on every request.
    assert MODEL_NAME in info["ReducioVAELoader"]["input"]["required"]["checkpoint"][1]["options"]


def _widget_names(node_info: dict) -> list[str]:
    names = []
    order = node_info["input_order"]
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = node_info["input"][section][name]
            opts = spec[1] if len(spec) > 1 else {}
            if (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
                    and not opts.get("forceInput"):
                names.append(name)
    return names


def _spec(node_info: dict, name: str):
    return node_info["input"].get("required", {}).get(name) or node_info["input"]["optional"][name]


@pytest.mark.parametrize("api_name", sorted(WORKFLOWS))
def test_ui_workflow_matches_object_info_and_its_api_twin(server, api_name):
    """The UI file loads with the right values: widgets_values line up with each node's widget
    inputs (stored by position, plus the frontend-only seed control and upload values), every link
    connects matching types at existing slots, and the graph equals the API twin's."""
    info = server.object_info()
    api = load(WORKFLOWS[api_name])
    ui = load(ui_twin(WORKFLOWS[api_name]))
    nodes = {node["id"]: node for node in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    assert ui["last_link_id"] >= max(links) and ui["last_node_id"] >= max(nodes)
    graph_nodes = {nid: n for nid, n in nodes.items() if n["type"] not in ("Note", "MarkdownNote")}
    assert sorted(graph_nodes) == sorted(int(n) for n in api)
    for node_id, node in graph_nodes.items():
        api_node = api[str(node_id)]
        assert node["type"] == api_node["class_type"] in info
        node_info = info[node["type"]]
        # Widget values, in order, with the frontend-only extras where the frontend puts them.
        values = list(node["widgets_values"])
        for name in _widget_names(node_info):
            spec = _spec(node_info, name)
            opts = spec[1] if len(spec) > 1 else {}
            value = values.pop(0)
            api_value = api_node["inputs"].get(name)
            if not isinstance(api_value, list):                  # not linked: the same value
                assert value == api_value, f"{api_name} node {node_id}: {name} = {value!r}, API {api_value!r}"
            if spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                assert values.pop(0) == "fixed", f"{api_name} node {node_id}: seed control must be 'fixed'"
            if opts.get("image_upload") or opts.get("video_upload"):
                assert values.pop(0) == "image"
        assert not values, f"{api_name} node {node_id} ({node['type']}) has extra widget values {values}"
        # Every linked API input is a link in the UI, with matching types at the right slots.
        for name, value in api_node["inputs"].items():
            if not isinstance(value, list):
                continue
            slot = next(i for i, inp in enumerate(node["inputs"]) if inp["name"] == name)
            link = links[node["inputs"][slot]["link"]]
            _, src, src_slot, dst, dst_slot, link_type = link
            assert (str(src), src_slot, dst, dst_slot) == (value[0], value[1], node_id, slot)
            assert info[nodes[src]["type"]]["output"][src_slot] == link_type
            expected_type = _spec(node_info, name)[0]
            assert link_type == ("COMBO" if isinstance(expected_type, list) else expected_type)
            assert link[0] in nodes[src]["outputs"][src_slot]["links"]
    api_edges = sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
    assert len(links) == api_edges


# ------------------------------------------------------------------------------------- running workflows
def test_roundtrip_workflow_writes_playable_videos(server):
    entry = server.run_prompt(load(WORKFLOWS["reducio_vae_roundtrip.json"]), timeout=900)
    assert entry["status"]["status_str"] == "success"
    (side_by_side,) = outputs_of(server, entry, "8")
    (reconstruction,) = outputs_of(server, entry, "10")
    count, height, width, rate = read_video(reconstruction)
    assert (count, height, width) == (PADDED_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH)
    assert rate == 16                                   # the input's frame rate, passed through
    count, height, width, _ = read_video(side_by_side)
    assert (count, height, width) == (PADDED_FRAMES, VIDEO_HEIGHT, 2 * VIDEO_WIDTH)


def test_encode_then_decode_through_latent_files(server):
    entry = server.run_prompt(load(WORKFLOWS["reducio_vae_encode_to_latent.json"]), timeout=900)
    (latent_file,) = outputs_of(server, entry, "5")
    (content_file,) = outputs_of(server, entry, "6")
    from PIL import Image, ImageSequence
    from safetensors.torch import load_file

    latent = load_file(str(latent_file))["latent_tensor"]
    # 2 clips x 4 latent frames; the tiny model's spatial factor is 8: ceil(36/8) x ceil(44/8).
    assert tuple(latent.shape) == (1, 8, 8, 5, 6)
    with Image.open(content_file) as image:
        content_frames = [frame.copy() for frame in ImageSequence.Iterator(image)]
    assert len(content_frames) == 2 and content_frames[0].size == (VIDEO_WIDTH, VIDEO_HEIGHT)

    # What the user does next: copy both files into the input folder and run the decode workflow.
    shutil.copy(latent_file, server.input_dir / "reducio_motion.latent")
    shutil.copy(content_file, server.input_dir / "reducio_content.png")
    entry = server.run_prompt(load(WORKFLOWS["reducio_vae_decode_from_latent.json"]), timeout=900)
    (video,) = outputs_of(server, entry, "6")
    count, height, width, rate = read_video(video)
    assert (count, height, width, rate) == (PADDED_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH, 16)


def test_progress_is_reported_per_clip_over_the_websocket(server):
    websocket = pytest.importorskip("websocket", reason="websocket-client not installed")
    _bump_mtime(server.input_dir / VIDEO_NAME, 5)           # make the graph run again, not come from cache
    connection = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}",
                                             timeout=900)
    try:
        status, payload = server.post_prompt(load(WORKFLOWS["reducio_vae_roundtrip.json"]))
        assert status == 200, payload
        prompt_id, progress = payload["prompt_id"], {}
        while True:
            message = connection.recv()
            if not isinstance(message, str):
                continue                                     # binary preview frames
            message = json.loads(message)
            data = message.get("data", {})
            if message["type"] == "progress" and data.get("prompt_id", prompt_id) == prompt_id:
                progress.setdefault(data["node"], []).append((data["value"], data["max"]))
            if message["type"] == "execution_error" and data.get("prompt_id") == prompt_id:
                pytest.fail(f"the workflow failed: {data.get('exception_message')}")
            if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        connection.close()
    # Encode (node 4) and decode (node 5) step once per tile of each clip: 2 clips x 2 x 2 tiles (the
    # tiny model's tile window is 40 px and the padded frame is 40 x 48, so 'auto' tiles), in order.
    for node_id in ("4", "5"):
        assert progress.get(node_id), f"no progress from node {node_id}: {progress}"
        assert progress[node_id] == [(step, 8) for step in range(1, 9)], progress[node_id]


def _bump_mtime(path: Path, seconds: int) -> None:
    """A new modification time makes Load Video (fingerprinted by mtime) and everything after it run
    again instead of coming from the server's cache."""
    stamp = path.stat().st_mtime + seconds
    os.utime(path, (stamp, stamp))


def test_bad_widget_value_is_rejected_with_node_errors(server):
    prompt = load(WORKFLOWS["reducio_vae_roundtrip.json"])
    prompt["4"]["inputs"]["frame_handling"] = "stretch"
    prompt["3"]["inputs"]["checkpoint"] = "no-such-model.safetensors"
    status, payload = server.post_prompt(prompt)
    assert status == 400
    assert set(payload["node_errors"]) >= {"3", "4"}
    text = json.dumps(payload["node_errors"])
    assert "frame_handling" in text and "checkpoint" in text


def test_wrong_socket_type_is_rejected(server):
    prompt = load(WORKFLOWS["reducio_vae_roundtrip.json"])
    prompt["5"]["inputs"]["motion_latent"] = ["2", 0]      # IMAGE into the LATENT socket
    status, payload = server.post_prompt(prompt)
    assert status == 400 and "5" in payload["node_errors"]


def test_runtime_error_names_the_problem_and_the_fix(server):
    prompt = load(WORKFLOWS["reducio_vae_roundtrip.json"])
    prompt["4"]["inputs"]["frame_handling"] = "error"       # 24 frames are not a multiple of 16
    with pytest.raises(AssertionError) as info:
        server.run_prompt(prompt, timeout=600)
    message = str(info.value)
    assert "ReducioVAEEncode" in message and "multiple of 16" in message and "pad_repeat_last" in message


def _comfy_cli() -> str | None:
    venv = Path(os.environ.get("COMFY_CLI_VENV", Path.home() / "comfy" / "cli-venv"))
    return str(venv / "bin" / "comfy") if (venv / "bin" / "comfy").exists() else shutil.which("comfy")


@pytest.mark.parametrize("kind", ["api", "ui"])
def test_comfy_cli_runs_the_roundtrip_workflow(server, kind, tmp_path):
    cli = _comfy_cli()
    if cli is None:
        pytest.skip("comfy-cli not installed (scripts/setup_comfyui.sh installs it)")
    api_path = WORKFLOWS["reducio_vae_roundtrip.json"]
    path = api_path if kind == "api" else ui_twin(api_path)
    _bump_mtime(server.input_dir / VIDEO_NAME, 10 if kind == "api" else 20)   # run, do not reuse the cache
    result = subprocess.run(
        [cli, "--skip-prompt", "run", "--workflow", str(path), "--host", "127.0.0.1", "--port", str(server.port),
         "--wait", "--timeout", "900"],
        capture_output=True, text=True, timeout=1000, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "reducio/roundtrip_reconstruction" in output or "roundtrip_reconstruction" in output, output
