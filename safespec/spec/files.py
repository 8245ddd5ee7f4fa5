"""The data-file checks of a validated spec: every split must exist as a readable CSV file or folder, and
the checkpoint as a readable file, each problem located at its field."""

from __future__ import annotations

import os
from pathlib import Path

from .models import Spec
from .reader import Loc, _Doc

# -------------------------------------------------------------------------------------------- checks
_DATA_FIELDS = ("protected", "target", "validation", "heldout", "base")


def _file_problems(spec: Spec, doc: _Doc, base: Path) -> list[str]:
    """Missing or unreadable data files and checkpoint, each with the field, its line and the path tried."""
    lines: list[str] = []

    def check(loc: Loc, written: Path | None, resolved: Path | None, *, allow_dir: bool) -> None:
        if written is None or resolved is None:
            return
        note = "" if written.is_absolute() else f" (from {str(written)!r}, relative to the spec's folder)"
        if not resolved.exists():
            lines.append(doc.line(loc, f"not found: {resolved}{note}"))
        elif resolved.is_dir():
            if not allow_dir:
                lines.append(doc.line(loc, f"is a folder, expected a checkpoint file: {resolved}"))
            elif not os.access(resolved, os.R_OK | os.X_OK):
                lines.append(doc.line(loc, f"folder is not readable: {resolved}"))
        elif allow_dir and resolved.suffix.lower() != ".csv":
            lines.append(
                doc.line(
                    loc,
                    f"must be a CSV manifest (.csv) or a folder with one sub-folder per class "
                    f"(got {resolved.name!r}): {resolved}",
                )
            )
        else:
            try:
                with open(resolved, "rb") as f:
                    f.read(1)
            except OSError as e:
                lines.append(doc.line(loc, f"cannot read {resolved}: {e.strerror or e}"))

    resolved = spec.resolve(base)
    check(("model", "checkpoint"), spec.model.checkpoint, resolved.model.checkpoint, allow_dir=False)
    for key in _DATA_FIELDS:
        check(("data", key), getattr(spec.data, key), getattr(resolved.data, key), allow_dir=True)
    return lines
