"""Writing (and removing) the rendered files of a run directory, each atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import atomic_write_text
from .html import render_html
from .junit import render_junit
from .load import load_run

REPORT_FILES = ("report.html", "junit.xml")


def remove_report(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the rendered outputs of a run directory; the runner calls it when a run starts or fails, so a stale
    report of an earlier run can never sit next to a failed state and be mistaken for this run's certificate."""
    removed = []
    for name in REPORT_FILES:
        path = Path(run_dir) / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def render_report(run_dir: str | os.PathLike, *, finishing: bool = False) -> dict[str, Path]:
    """Render report.html and junit.xml into the run directory, each written atomically."""
    run = load_run(run_dir, finishing=finishing)
    html = render_html(run)
    junit = render_junit(run.result)
    out = {"html": run.run_dir / "report.html", "junit": run.run_dir / "junit.xml"}
    atomic_write_text(out["junit"], junit)
    atomic_write_text(out["html"], html)
    return out
