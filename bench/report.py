"""Writing a quality bench's results: one JSON, one Markdown table that links the contact sheet."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, report: dict, lines: list[str]) -> None:
    """``out``.json from ``report``; ``out``.md from ``lines`` plus a link to ``out``.png; print the table."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    sheet = out.with_suffix(".png").name
    lines = [*lines, "", f"Contact sheet: [{sheet}]({sheet})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
