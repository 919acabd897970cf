"""Where the golden data lives: the one rule every test, script and bench follows.

The golden data (outputs of the official implementations on tiny models) is part of the repository
in ``tests/golden/`` (see its README for where it came from and how to update it). A missing folder or
file is an error that says what is missing, never a skipped test.
"""
from __future__ import annotations

from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"


class MissingGoldenData(FileNotFoundError):
    pass


def golden_path(*parts: str) -> Path:
    """``tests/golden/<parts...>``, checked to exist."""
    path = GOLDEN_DIR.joinpath(*parts)
    if not path.exists():
        raise MissingGoldenData(
            f"golden data missing: {path}. It is part of the repository (tests/golden); restore it with "
            "`git checkout -- tests/golden`, or see tests/golden/README.md to regenerate it.")
    return path
