"""Number formatting and inline-SVG chart geometry for the audit report.

Charts are computed here as plain numbers and short labels; templates/_charts.j2 draws them. Keeping markup
out of Python means every label (a class name, a capability name) reaches the page only through Jinja2
autoescaping. Nothing here imports numpy or scipy: the report must render anywhere result.json can be read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

STATUS_COLORS = {
    "certified": "#1a7f37",
    "preserved": "#9a6700",
    "violated": "#cf222e",
    "inconclusive": "#6e7781",
    None: "#0969da",  # the target, or a class no capability protects
}
PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#6e7781", "#9a6700", "#0550ae")
MAX_CONFUSION_CLASSES = 20
DISPLAY_CONFIDENCE = 0.95


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): the values a chart can place and a table can format."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------- formats
def pct(x: Any, digits: int = 1) -> str:
    return "n/a" if not is_number(x) else f"{100 * x:.{digits}f}%"


def pp(x: Any, digits: int = 1, signed: bool = False) -> str:
    """Percentage points: changes, bounds and tolerances are differences of accuracies."""
    if not is_number(x):
        return "n/a"
    v = 100 * x
    if abs(v) < 0.5 * 10**-digits:
        v = 0.0
    return f"{v:+.{digits}f} pp" if signed else f"{v:.{digits}f} pp"


def conf(x: Any) -> str:
    if not is_number(x):
        return "n/a"
    return f"{100 * x:.2f}".rstrip("0").rstrip(".") + "%"


def fmt_int(x: Any) -> str:
    return "n/a" if not is_number(x) else f"{int(x):,}"


def fmt_num(x: Any, digits: int = 3) -> str:
    return "n/a" if not is_number(x) else f"{x:.{digits}f}"


def sub(a: Any, b: Any) -> float | None:
    return a - b if is_number(a) and is_number(b) else None


def wilson_interval(k: int, n: int, confidence: float = DISPLAY_CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Wilson score interval of a proportion: display error bars only (the certificate's
    bounds come from safespec.certify and are in result.json)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def clean(text: Any, limit: int | None = None) -> str:
    """One-line text for attribute-like places (labels, junit names); escaping happens elsewhere."""
    s = " ".join(str(text).split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return s


# ----------------------------------------------------------------------------------------- charts
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 else round(t, 12))
        t += step
    return ticks


def _tick_label(v: float, step: float, unit: str) -> str:
    if unit == "%":
        digits = 0 if step * 100 >= 1 else 1
        return f"{v * 100:.{digits}f}"
    if unit == "pp":
        digits = 0 if step * 100 >= 1 else 1
        return f"{v * 100:+.{digits}f}" if v else "0"
    if abs(v) >= 1e4 or (v and abs(v) < 1e-3):
        return f"{v:.0e}"
    digits = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{v:.{digits}f}"


@dataclass
class Axis:
    lo: float
    hi: float
    px_lo: float
    px_hi: float
    ticks: list[tuple[float, str]]

    def __call__(self, v: float) -> float:
        if self.hi == self.lo:
            return (self.px_lo + self.px_hi) / 2
        return round(self.px_lo + (v - self.lo) * (self.px_hi - self.px_lo) / (self.hi - self.lo), 2)


def _axis(
    values: Iterable[float | None],
    px_lo: float,
    px_hi: float,
    unit: str = "",
    pad: float = 0.05,
    clamp: tuple[float, float] | None = None,
    count: int = 5,
) -> Axis:
    vals = [float(v) for v in values if v is not None and is_number(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    span = hi - lo or max(abs(hi), 1e-3)
    lo, hi = lo - pad * span, hi + pad * span
    if clamp:
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
    ticks = nice_ticks(lo, hi, count)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    ax = Axis(lo, hi, px_lo, px_hi, [])
    ax.ticks = [(ax(t), _tick_label(t, step, unit)) for t in ticks]
    return ax


def _segments(points: Sequence[tuple[Any, Any]], xa: Axis, ya: Axis) -> list[str]:
    """SVG polyline point lists; a missing value breaks the line instead of inventing one."""
    out, cur = [], []
    for x, y in points:
        if is_number(x) and is_number(y):
            cur.append(f"{xa(x)},{ya(y)}")
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def line_chart(
    series: list[dict[str, Any]],
    *,
    width: int = 330,
    height: int = 170,
    y_unit: str = "",
    hlines: Sequence[tuple[float, str, str]] = (),
    vline: float | None = None,
    y_clamp: tuple[float, float] | None = None,
    x_label: str = "step",
    y_label: str = "",
    title: str = "",
) -> dict[str, Any]:
    """Geometry of a line chart (numbers and labels only); templates/_charts.j2 draws it."""
    left, right, top, bottom = 46, 10, 8 if not title else 20, 30
    xs = [p[0] for s in series for p in s["points"]]
    ys = [p[1] for s in series for p in s["points"]] + [h[0] for h in hlines]
    xa = _axis(xs + ([vline] if vline is not None else []), left, width - right, pad=0.0)
    ya = _axis(ys, height - bottom, top, unit=y_unit, clamp=y_clamp, count=4)
    drawn = []
    for i, s in enumerate(series):
        drawn.append(
            {
                "label": s.get("label", ""),
                "color": s.get("color") or PALETTE[i % len(PALETTE)],
                "width": s.get("width", 1.6),
                "dash": s.get("dash", ""),
                "segments": _segments(s["points"], xa, ya),
                "dots": [(xa(x), ya(y)) for x, y in s["points"] if is_number(x) and is_number(y)]
                if s.get("dots")
                else [],
            }
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "top": top,
        "bottom": height - bottom,
        "xticks": xa.ticks,
        "yticks": ya.ticks,
        "series": drawn,
        "title": title,
        "hlines": [{"y": ya(v), "label": label, "color": color} for v, label, color in hlines if ya.lo <= v <= ya.hi],
        "vline": xa(vline) if vline is not None and xa.lo <= vline <= xa.hi else None,
        "x_label": x_label,
        "y_label": y_label,
    }


def interval_chart(rows: list[dict[str, Any]], *, width: int = 1000) -> dict[str, Any]:
    """Per-class old vs new accuracy, each with a Wilson error bar (a dumbbell per class)."""
    row_h, left, right, top = 20, 190, 16, 10
    height = top + row_h * len(rows) + 34
    vals = [v for r in rows for v in (r["old_lo"], r["old_hi"], r["new_lo"], r["new_hi"])]
    xa = _axis(vals, left, width - right, unit="%", clamp=(0.0, 1.0), pad=0.03)
    out = []
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(
            {
                "y": y,
                "label": clean(r["label"], 26),
                "full": r["label"],
                "color": r["color"],
                "tag": r.get("tag", ""),
                "old": (xa(r["old"]), xa(r["old_lo"]), xa(r["old_hi"])) if is_number(r["old"]) else None,
                "new": (xa(r["new"]), xa(r["new_lo"]), xa(r["new_hi"])) if is_number(r["new"]) else None,
                "tooltip": r["tooltip"],
            }
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "top": top,
        "bottom": top + row_h * len(rows),
        "xticks": xa.ticks,
        "rows": out,
        "row_h": row_h,
    }


def forest_chart(caps: list[dict[str, Any]], *, width: int = 1000) -> dict[str, Any]:
    """The certificate as a picture: per capability, the observed accuracy change and its one-sided
    lower confidence limit (= -drop bound) against that capability's tolerance (the margin)."""
    row_h, left, right, top = 20, 190, 16, 10
    height = top + row_h * len(caps) + 34
    vals: list[float | None] = [0.0]  # None: no bound (the axis skips it)
    for c in caps:
        vals += [c["change"], -c["drop_upper_bound"] if is_number(c["drop_upper_bound"]) else None, -c["tolerance"]]
    xa = _axis(vals, left, width - right, unit="pp", pad=0.08, clamp=(-1.0, 1.0))
    out = []
    for i, c in enumerate(caps):
        y = top + row_h * i + row_h / 2
        lo = -c["drop_upper_bound"] if is_number(c["drop_upper_bound"]) else None
        out.append(
            {
                "y": y,
                "label": clean(c["name"], 26),
                "full": c["name"],
                "color": STATUS_COLORS[c["status"]],
                "status": c["status"],
                "est": xa(c["change"]) if is_number(c["change"]) else None,
                "lo": xa(lo) if lo is not None else None,
                "tol": xa(-c["tolerance"]) if is_number(c["tolerance"]) else None,
                "tooltip": (
                    f"{c['name']}: change {pp(c['change'], 1, True)}, drop bound {pp(c['drop_upper_bound'], 2)}"
                    f" at {conf(c['confidence'])}, tolerance {pp(c['tolerance'], 2)}: {c['status']}"
                ),
            }
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "top": top,
        "bottom": top + row_h * len(caps),
        "xticks": xa.ticks,
        "zero": xa(0.0),
        "rows": out,
        "row_h": row_h,
    }


def scatter_chart(points: list[dict[str, Any]], *, size: int = 420) -> dict[str, Any]:
    """Old vs new accuracy, one dot per class: the aggregate view when there are too many classes for rows."""
    margin = 46
    vals = [v for p in points for v in (p["old"], p["new"])]
    lo = min([v for v in vals if is_number(v)] or [0.0])
    lo = max(0.0, math.floor(lo * 10) / 10)
    xa = _axis([lo, 1.0], margin, size - 12, unit="%", pad=0.0, clamp=(0.0, 1.0))
    ya = _axis([lo, 1.0], size - margin + 12, 12, unit="%", pad=0.0, clamp=(0.0, 1.0))
    dots = [
        {"x": xa(p["old"]), "y": ya(p["new"]), "color": p["color"], "tooltip": p["tooltip"]}
        for p in points
        if is_number(p["old"]) and is_number(p["new"])
    ]
    return {
        "width": size,
        "height": size,
        "left": margin,
        "right": size - 12,
        "top": 12,
        "bottom": size - margin + 12,
        "xticks": xa.ticks,
        "yticks": ya.ticks,
        "dots": dots,
        "diag": (xa(xa.lo), ya(xa.lo), xa(xa.hi), ya(xa.hi)),
    }


def heatmap(classes: list[str], old: list[list[int]], new: list[list[int]]) -> dict[str, Any] | None:
    """Change of the confusion matrix (new - old), rows = true class, columns = predicted class."""
    k = len(classes)
    if not (0 < k <= MAX_CONFUSION_CLASSES) or len(old) != k or len(new) != k:
        return None
    if any(len(r) != k for r in old) or any(len(r) != k for r in new):
        return None
    diff = [[new[i][j] - old[i][j] for j in range(k)] for i in range(k)]
    vmax = max(1, max(abs(v) for row in diff for v in row))
    cell, left, top = 30, 130, 110
    cells = []
    for i in range(k):
        for j in range(k):
            v = diff[i][j]
            good = v > 0 if i == j else v < 0  # more correct, or fewer confusions
            alpha = 0.0 if v == 0 else 0.15 + 0.75 * abs(v) / vmax
            cells.append(
                {
                    "x": left + j * cell,
                    "y": top + i * cell,
                    "v": v,
                    "alpha": round(alpha, 3),
                    "color": "#1a7f37" if good else "#cf222e",
                    "tooltip": f"true {classes[i]}, predicted {classes[j]}: {old[i][j]} -> {new[i][j]}",
                }
            )
    labels = [{"label": clean(c, 16), "full": c, "pos": i * cell + cell / 2} for i, c in enumerate(classes)]
    return {
        "width": left + k * cell + 10,
        "height": top + k * cell + 10,
        "left": left,
        "top": top,
        "cell": cell,
        "cells": cells,
        "labels": labels,
    }
