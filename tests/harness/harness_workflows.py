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

from harness_comfyui import REPO_ROOT

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
