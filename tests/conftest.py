"""Shared pytest set-up for the three test tiers.

tier 1  tests/unit    pure PyTorch, no ComfyUI (always runs)
tier 2  tests/comfy   a real ComfyUI imported in-process (fixture ``comfy``)
tier 3  tests/server  a real headless ComfyUI server with the pack loaded (fixture ``comfy_server``)

Tiers 2 and 3 use the ComfyUI found through ``COMFYUI_PATH`` or ``~/comfy/ComfyUI`` and must run
under that ComfyUI's Python. When none is found they are skipped with a loud banner, or fail when
``REDUCIO_REQUIRE_COMFYUI=1`` (set by scripts/test.sh in CI): a missing ComfyUI never passes silently.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

from testkit.golden import golden_path  # noqa: E402
from testkit.comfyui import REPO_ROOT, InProcessComfy, locate_comfyui, missing_comfyui_message  # noqa: E402

TIERS = {"unit": "tier 1 (pure)", "comfy": "tier 2 (in-process ComfyUI)", "server": "tier 3 (ComfyUI server)"}
_COMFY_INSTALL = locate_comfyui()
_tier_outcomes: Counter = Counter()


def _tier_of(path) -> str | None:
    try:
        rel = Path(str(path)).resolve().relative_to(TESTS_DIR)
    except ValueError:
        return None
    return rel.parts[0] if rel.parts and rel.parts[0] in TIERS else None


def _comfy_required() -> bool:
    return os.environ.get("REDUCIO_REQUIRE_COMFYUI") == "1"


def pytest_report_header(config):
    if _COMFY_INSTALL is None:
        return ["ComfyUI: NOT FOUND (tiers 2 and 3 cannot run)"]
    return [f"ComfyUI: {_COMFY_INSTALL.version} at {_COMFY_INSTALL.root} (python {sys.executable})"]


def pytest_collection_modifyitems(config, items):
    if _COMFY_INSTALL is not None:
        return
    for item in items:
        # Required (CI): leave the items alone; the comfy_install fixture fails them loudly.
        if _tier_of(item.fspath) in ("comfy", "server") and not _comfy_required():
            item.add_marker(pytest.mark.skip(reason="NO ComfyUI FOUND: tier not run (see banner)"))


def pytest_runtest_logreport(report):
    tier = _tier_of(report.fspath)
    if tier is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "skipped" if report.skipped else report.outcome
        _tier_outcomes[(tier, outcome)] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.section("reducio-fastattn: what ran")
    version = f"ComfyUI {_COMFY_INSTALL.version}" if _COMFY_INSTALL else "no ComfyUI"
    for tier, label in TIERS.items():
        counts = {o: _tier_outcomes[(tier, o)] for o in ("passed", "failed", "skipped")}
        if not any(counts.values()):
            continue
        suffix = f" against {version}" if tier != "unit" else ""
        tr.write_line(f"{label}{suffix}: {counts['passed']} passed, {counts['failed']} failed, "
                      f"{counts['skipped']} skipped")
    if _COMFY_INSTALL is None and any(_tier_outcomes[(t, o)] for t in ("comfy", "server")
                                      for o in ("passed", "failed", "skipped")):
        tr.write_line(missing_comfyui_message(), red=True, bold=True)
        if _comfy_required():
            tr.write_line("REDUCIO_REQUIRE_COMFYUI=1: failing the run.", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    if _COMFY_INSTALL is None and _comfy_required() and any(
            _tier_outcomes[(t, o)] for t in ("comfy", "server") for o in ("passed", "failed", "skipped")):
        session.exitstatus = 1


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden data kept in the repository (tests/golden; see its README). Missing data fails."""
    return golden_path()


@pytest.fixture(scope="session")
def comfy_install():
    if _COMFY_INSTALL is None:
        pytest.fail(missing_comfyui_message()) if _comfy_required() else pytest.skip("no ComfyUI found")
    return _COMFY_INSTALL


@pytest.fixture(scope="session")
def comfy(comfy_install, tmp_path_factory) -> InProcessComfy:
    """Tier 2: the real ComfyUI imported in this process, the pack loaded by ComfyUI's loader."""
    try:
        return InProcessComfy(comfy_install, tmp_path_factory.mktemp("comfy_inprocess"))
    except ImportError as exc:
        pytest.fail(f"cannot import ComfyUI {comfy_install.version} from {comfy_install.root} with "
                    f"{sys.executable}: {exc}. Run tiers 2-3 with that ComfyUI's venv python "
                    "(scripts/test.sh does).")


@pytest.fixture(scope="session")
def comfy_server(comfy_install, tmp_path_factory):
    """Tier 3: a real headless ComfyUI server (CPU) with the pack loaded from this checkout."""
    from testkit.server import ComfyServer

    server = ComfyServer(comfy_install, tmp_path_factory.mktemp("comfy_server"))
    server.start()
    yield server
    server.stop()
