"""scripts/setup_comfyui.sh gets the pinned ComfyUI versions by a shallow clone of the release tags, or
from a local mirror given by environment variable, says which, and refuses a wrong version.

The "official repository" here is a local git repository with the two release tags (this machine
reaches no git host); the script clones it exactly as it clones the real one.
"""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup_comfyui.sh"


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def _fake_comfy_repo(path: Path, versions=("0.3.64", "0.8.0")) -> Path:
    path.mkdir()
    _git(path, "init", "-q", "-b", "master")
    for version in versions:
        (path / "main.py").write_text("print('comfy')\n")
        (path / "requirements.txt").write_text("")
        (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", f"ComfyUI v{version}")
        _git(path, "tag", f"v{version}")
    (path / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')   # master moved on
    _git(path, "commit", "-qam", "later")
    return path


def _run(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("COMFYUI")}
    base.update(COMFYUI_SOURCE_ONLY="1", COMFYUI_PATH=str(tmp_path / "c080"),
                COMFYUI_0364_PATH=str(tmp_path / "c0364"), **env)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=base, timeout=120)


def _version(folder: Path) -> str:
    return (folder / "comfyui_version.py").read_text().split('"')[1]


def test_clones_the_release_tags_when_no_mirror_is_given(tmp_path):
    repo = _fake_comfy_repo(tmp_path / "upstream")
    done = _run(tmp_path, COMFYUI_REPO=f"file://{repo}")
    assert done.returncode == 0, done.stderr
    assert "cloning tag v0.8.0" in done.stdout and "cloning tag v0.3.64" in done.stdout
    assert _version(tmp_path / "c080") == "0.8.0" and _version(tmp_path / "c0364") == "0.3.64"
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=tmp_path / "c080",
                             capture_output=True, text=True).stdout.strip()
    assert shallow == "true"
    again = _run(tmp_path, COMFYUI_REPO=f"file://{repo}")
    assert again.returncode == 0 and again.stdout.count("using the existing checkout") == 2


def test_mirror_from_environment_is_used_offline(tmp_path):
    mirror_080 = _fake_comfy_repo(tmp_path / "m080", versions=("0.8.0",))
    _git(mirror_080, "reset", "-q", "--hard", "v0.8.0")
    mirror_0364 = _fake_comfy_repo(tmp_path / "m0364", versions=("0.3.64",))
    _git(mirror_0364, "reset", "-q", "--hard", "v0.3.64")
    done = _run(tmp_path, COMFYUI_REPO="file:///nonexistent", COMFYUI_MIRROR=str(mirror_080),
                COMFYUI_0364_MIRROR=str(mirror_0364))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("extracting HEAD of the local mirror") == 2
    assert _version(tmp_path / "c080") == "0.8.0" and _version(tmp_path / "c0364") == "0.3.64"


@pytest.mark.parametrize("case", ["wrong_version", "missing_mirror", "unreachable"])
def test_failures_are_loud(tmp_path, case):
    if case == "wrong_version":   # a mirror whose HEAD is not the pinned release
        mirror = _fake_comfy_repo(tmp_path / "m", versions=("0.8.0",))
        done = _run(tmp_path, COMFYUI_MIRROR=str(mirror), COMFYUI_0364_MIRROR=str(mirror))
        assert "expected 0.8.0" in done.stderr
    elif case == "missing_mirror":
        done = _run(tmp_path, COMFYUI_MIRROR=str(tmp_path / "nope"), COMFYUI_0364_MIRROR=str(tmp_path / "nope"))
        assert "does not exist" in done.stderr
    else:
        done = _run(tmp_path, COMFYUI_REPO=f"file://{tmp_path}/nope")
        assert "COMFYUI_MIRROR" in done.stderr   # names the offline fix
    assert done.returncode != 0
