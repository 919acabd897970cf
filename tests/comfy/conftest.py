"""Tier 2 fixtures shared by the DiTFastAttn test modules: the pack's modules as ComfyUI loaded them,
and tiny randomly initialised native models (see fastattn_tiny.py)."""

import pytest

from testkit import fastattn_tiny as tiny  # noqa: E402


@pytest.fixture(scope="module")
def fa(comfy):
    return tiny.PackModules(comfy)


@pytest.fixture(scope="module")
def wan():
    return tiny.tiny_wan(seed=0)


@pytest.fixture(scope="module")
def flux():
    return tiny.tiny_flux(seed=0)


@pytest.fixture
def plans_dir(comfy, tmp_path, monkeypatch):
    """A fresh plans folder that the nodes save into (first folder of 'ditfastattn_plans')."""
    import folder_paths

    folder = tmp_path / "ditfastattn_plans"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ditfastattn_plans", ([str(folder)], {".json"}))
    return folder
