"""The audit outputs of a finished run: report.html, junit.xml and the terminal summary.

Everything here is rendered from ``result.json`` and the run directory alone (trajectory.jsonl,
flips/*.png): no torch, no spec re-reading, no model. That is what makes a report reproducible and
auditable long after the training environment is gone, and it keeps ``safespec report RUN_DIR`` fast.

Safety properties this package enforces rather than trusts:
- a run whose ``state.json`` says it failed (or never finished) is refused, and a ``result.json`` whose
  verdict contradicts its own capabilities is refused, so no "certified" page is ever rendered from
  something that was not certified (``load``);
- every string that came from a spec, a manifest or a file name reaches the page only through Jinja2
  autoescaping (the charts are Jinja macros fed with numbers, not Python-built markup), and the page
  carries no scripts and no external resources (``html``);
- thumbnails are embedded only from PNG files inside the run directory (a path in result.json cannot
  pull an arbitrary file of the host into a report that is then shared) (``view``).

One module per job: ``load`` (the run back from disk), ``view`` (the page's view model), one renderer per
channel (``html``, ``junit``, ``terminal``), ``charts`` (chart geometry and number formats) and ``write``."""

from __future__ import annotations

from .html import render_html
from .junit import render_junit
from .load import SCHEMA_VERSION, STATUSES, RunData, load_run, result_schema, validate_result
from .terminal import summary_text
from .view import build_context
from .write import REPORT_FILES, remove_report, render_report

__all__ = [
    "REPORT_FILES",
    "SCHEMA_VERSION",
    "STATUSES",
    "RunData",
    "build_context",
    "load_run",
    "remove_report",
    "render_html",
    "render_junit",
    "render_report",
    "result_schema",
    "summary_text",
    "validate_result",
]
