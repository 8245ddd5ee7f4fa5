"""What ``safespec lineage list`` and ``show`` print: plain text from the index alone."""

from __future__ import annotations

from .registry import Registry, Release


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest.split(":", 1)[-1][:12]


def list_text(reg: Registry) -> str:
    """One line per release, oldest first: number, digest, parent, spec name, target, capabilities kept."""
    if not reg.releases:
        return f"{reg.path}: no release yet"
    rows = [("release", "digest", "parent", "name", "target", "certified", "created")]
    for r in reg.releases:
        rows.append(
            (
                str(r.id),
                _short(r.digest),
                _short(r.parent),
                r.name,
                r.target or "-",
                str(len(r.certified)) if r.id else "origin",
                r.created,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def show_text(reg: Registry, r: Release) -> str:
    """A release in full: its identity, what it was certified for and its per-class accuracy."""
    lines = [
        f"{r.label} of {reg.path}",
        f"  digest:  {r.digest}",
        f"  parent:  {r.parent or '- (the origin)'}",
        f"  name:    {r.name}",
        f"  target:  {r.target or '-'}",
        f"  created: {r.created}",
        f"  model:   {reg.model_path(r)}",
    ]
    if r.certified:
        lines.append("  certified for: " + ", ".join(c.name for c in r.certified))
    if r.accuracy:
        lines.append("  held-out accuracy (its own cycle's split):")
        width = max(len(k) for k in r.accuracy)
        lines += [f"    {k.ljust(width)}  {v:.3f}" for k, v in r.accuracy.items()]
    lines.append("  files:")
    lines += [f"    {name}  {sha}" for name, sha in r.files.items()]
    return "\n".join(lines)
