"""Reading the pack's example workflows for tests.

``workflows/<name>.json`` is the UI format (what users load and share; ComfyUI lists these files in its
template browser) and ``workflows/api/<name>.json`` its API-format twin (for ``POST /prompt`` and
``comfy run --workflow``). The twins live in a sub-folder because ComfyUI's template scan lists every
``.json`` directly in ``workflows/``, and an API-format file opened from the template browser gives an
empty or broken graph.
"""
from __future__ import annotations

import json
from pathlib import Path

from testkit.comfyui import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"


def api_workflows(prefix: str = "") -> list[Path]:
    return sorted(API_DIR.glob(f"{prefix}*.json"))


def ui_workflows(prefix: str = "") -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob(f"{prefix}*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def ui_twin(api_path: Path) -> Path:
    return WORKFLOWS_DIR / api_path.name


def api_twin(ui_path: Path) -> Path:
    return API_DIR / ui_path.name


# ------------------------------------------------------------------ inputs and settings the example runs share
# (the tier-3 workflow tests and scripts/demo.py's stand-in runs)
VIDEO_NAME = "reducio_example.mp4"             # the Reducio VAE workflows' LoadVideo file
FASTATTN_MODEL_FILE = "cosmos_predict2_2B_t2i.safetensors"   # the DiTFastAttn workflows' UNETLoader file
# Small settings for a 2-core CPU; node ids as in the workflow files.
OVERRIDES = {
    "ditfastattn_image_calibrate_apply": {"4": {"width": 64, "height": 64}},
    "ditfastattn_video_calibrate_apply": {"4": {"width": 64, "height": 64, "length": 9}},
    "ditfastattn_v2_calibrate_apply": {"4": {"width": 64, "height": 64}},
}
COMMON_OVERRIDES = {"5": {"steps": 3, "threshold": 0.1}, "7": {"steps": 3}}


def write_test_video(path: Path, frames: int, height: int, width: int, fps: int = 16) -> None:
    """A small moving-gradient H.264 clip written with PyAV (ComfyUI's own video library)."""
    import av
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            rgb = np.stack([(xs * 5 + t * 8) % 256, (ys * 6 + t * 4) % 256,
                            np.full_like(xs, 40 + t * 6)], axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
