"""Tier 1: the pack's metadata is what ComfyUI's registry and comfy-cli expect."""
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest


def test_pyproject_comfy_metadata(repo_root):
    meta = tomllib.loads((repo_root / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()   # registry naming rule: no "ComfyUI" in the name
    assert project["version"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy
    assert comfy["requires-comfyui"] == ">=0.3.60"
    assert "web" not in comfy  # WEB_DIRECTORY only; both would load JS twice


def _comfy_cli() -> str | None:
    venv = Path(os.environ.get("COMFY_CLI_VENV", Path.home() / "comfy" / "cli-venv"))
    return str(venv / "bin" / "comfy") if (venv / "bin" / "comfy").exists() else shutil.which("comfy")


def test_comfy_node_validate_is_clean(repo_root):
    cli = _comfy_cli()
    if cli is None:
        pytest.skip("comfy-cli not installed (scripts/setup_comfyui.sh installs it)")
    result = subprocess.run([cli, "--skip-prompt", "node", "validate"], cwd=repo_root,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "passed" in output.lower(), output
    assert "S102" not in output and "S307" not in output and "E702" not in output, output
