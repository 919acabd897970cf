"""Reading the pack's example workflows (UI format + API-format twins) for tests."""
from __future__ import annotations

import json
from pathlib import Path

from harness_comfyui import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / "workflows"


def api_workflows(prefix: str = "") -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob(f"{prefix}*.api.json"))


def ui_workflows(prefix: str = "") -> list[Path]:
    return sorted(p for p in WORKFLOWS_DIR.glob(f"{prefix}*.json") if not p.name.endswith(".api.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def ui_twin(api_path: Path) -> Path:
    return api_path.with_name(api_path.name[: -len(".api.json")] + ".json")
