"""The audit report: one model (model.py) written as JSON, HTML and Markdown (JUnit by pytest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conformance.report import html, markdown


def write(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / "audit.json": json.dumps(report, indent=2, sort_keys=False) + "\n",
        out / "audit.html": html.render(report),
        out / "audit.md": markdown.render(report),
    }
    for path, text in files.items():
        path.write_text(text)
    return list(files)
