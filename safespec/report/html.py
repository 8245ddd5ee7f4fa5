"""The HTML channel: the Jinja2 environment (autoescaped, templates from the package) and the page."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import jinja2

from ..errors import RunError
from .charts import (
    clean,
    conf,
    fmt_int,
    fmt_num,
    is_number,
    pct,
    pp,
)
from .load import RunData
from .view import build_context


# ------------------------------------------------------------------------------------------ render
def _load_template_source(name: str) -> tuple[str, None, Any]:
    """Templates are read through importlib.resources so a zipped or wheel install finds them too."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise jinja2.TemplateNotFound(name)
    ref = resources.files("safespec.templates").joinpath(name)
    try:
        source = ref.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise jinja2.TemplateNotFound(name) from None
    return source, None, lambda: True


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """Compiled once per process: compiling the templates costs far more than rendering them."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template_source),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=pct, pp=pp, conf=conf, int=fmt_int, num=fmt_num, clean=clean)
    env.globals.update(is_number=is_number)
    return env


def render_html(run: RunData) -> str:
    """The self-contained audit document (no scripts, no external resources)."""
    html = _environment().get_template("report.html.j2").render(**build_context(run))
    if re.search(r"<\s*script", html, re.IGNORECASE):  # belt and braces: autoescape should make this impossible
        raise RunError(f"{run.run_dir}: refusing to write a report that contains a <script> element")
    return html
