"""The view model: one dict of everything the HTML page shows, computed from a loaded run (charts as
numbers and geometry, thumbnails as data URIs, large specs aggregated)."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from ..result import STATUSES, meets
from .charts import (
    DISPLAY_CONFIDENCE,
    STATUS_COLORS,
    forest_chart,
    heatmap,
    interval_chart,
    is_number,
    line_chart,
    pct,
    scatter_chart,
    sub,
    wilson_interval,
)
from .load import RunData, _inside

# Above these sizes the page switches from one mark per item to aggregates plus the worst items, so a
# 364-class spec still gives a report that opens quickly and prints in a sane number of pages.
MAX_ROWS_PER_CHART = 40
MAX_SMALL_MULTIPLES = 24
MAX_LINES_PER_CHART = 10
MAX_THUMBS_PER_CLASS = 12
MAX_THUMB_BYTES = 512 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- view model
def _class_status(caps: list[dict[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in caps:
        for cls in c["classes"]:
            out[cls] = c["status"]
        for pc in c.get("per_class") or ():
            if pc.get("status") in STATUSES:
                out[pc["class"]] = pc["status"]
    return out


def _norm_capability(c: dict[str, Any], require: str, index: int) -> dict[str, Any]:
    change = c.get("accuracy_change")
    if not is_number(change):
        change = sub(c.get("new_accuracy"), c.get("old_accuracy"))
    per_class = []
    for pc in c.get("per_class") or ():
        per_class.append(
            {
                "cls": pc["class"],
                "n": pc["n"],
                "old": pc.get("old_accuracy"),
                "new": pc.get("new_accuracy"),
                "change": sub(pc.get("new_accuracy"), pc.get("old_accuracy")),
                "neg": pc.get("negative_flips"),
                "pos": pc.get("positive_flips"),
                "drop_upper_bound": pc.get("drop_upper_bound"),
                "status": pc.get("status"),
            }
        )
    ok = meets(c["status"], require)
    return {
        "index": index,
        "name": c["name"],
        "classes": list(c["classes"]),
        "status": c["status"],
        "meets": ok,
        "tolerance": c["tolerance"],
        "confidence": c["confidence"],
        "n": c["n"],
        "old": c.get("old_accuracy"),
        "new": c.get("new_accuracy"),
        "change": change,
        "drop_upper_bound": c.get("drop_upper_bound"),
        "new_accuracy_lower": c.get("new_accuracy_lower"),
        "flip_rate_upper": c.get("flip_rate_upper"),
        "neg": c.get("negative_flips"),
        "pos": c.get("positive_flips"),
        "needed_n": c.get("needed_n"),
        "per_class": per_class if (len(c["classes"]) > 1 or len(per_class) > 1) else [],
    }


def _needed_text(cap: dict[str, Any], short: bool = False) -> str:
    """Needed n is null when no sample size would certify at the observed rates (a real drop beyond tolerance)."""
    if cap["status"] == "certified":
        return ""
    if not cap.get("n"):
        return "no images" if short else "no held-out images: collect some"
    if is_number(cap.get("needed_n")):
        return f"{int(cap['needed_n']):,}"
    if cap["status"] == "violated":
        return "unreachable" if short else "not reachable at the observed rates"
    return "n/a"


def _thumbnail(run_dir: Path, rel: Any) -> str | None:
    path = _inside(run_dir, rel)
    if path is None or not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_THUMB_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _flip_groups(run: RunData, per_class: dict[str, dict[str, Any]], target: str | None) -> list[dict[str, Any]]:
    flips_by_class: dict[str, list[dict[str, Any]]] = {}
    for f in run.result.get("flips") or ():
        flips_by_class.setdefault(f["class"], []).append(f)
    names = [c for c, pc in per_class.items() if (pc.get("negative_flips") or 0) > 0 or c in flips_by_class]
    names += [c for c in flips_by_class if c not in names]
    groups = []
    for cls in names:
        pc = per_class.get(cls, {})
        flips = flips_by_class.get(cls, [])
        shown = []
        for f in flips[:MAX_THUMBS_PER_CLASS]:
            shown.append(
                {
                    "src": _thumbnail(run.run_dir, f.get("path")),
                    "path": f.get("path") or "",
                    "source": f.get("source") or "",
                    "old_pred": f.get("old_pred") or "?",
                    "new_pred": f.get("new_pred") or "?",
                }
            )
        groups.append(
            {
                "cls": cls,
                "is_target": cls == target,
                "n": pc.get("n"),
                "neg": pc.get("negative_flips", len(flips)),
                "pos": pc.get("positive_flips"),
                "thumbs": shown,
                "more": max(0, len(flips) - len(shown)),
            }
        )
    groups.sort(key=lambda g: -(g["neg"] or 0))
    return groups


def _traj_series(traj: list[dict[str, Any]], key: str) -> dict[str, list[tuple[Any, Any]]]:
    """Per-name series of a dict-valued trajectory field (constraints, u, multipliers, val_accuracy)."""
    names: list[str] = []
    for t in traj:
        for k in t.get(key) or {}:
            if k not in names:
                names.append(k)
    return {k: [(t["step"], (t.get(key) or {}).get(k)) for t in traj] for k in names}


def _quantile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _aggregate_series(series: dict[str, list[tuple[Any, Any]]]) -> list[dict[str, Any]]:
    steps = [x for x, _ in next(iter(series.values()))]
    rows = []
    for i, x in enumerate(steps):
        vals = [s[i][1] for s in series.values() if i < len(s) and is_number(s[i][1])]
        rows.append((x, vals))
    return [
        {"label": "max over capabilities", "color": "#cf222e", "points": [(x, max(v) if v else None) for x, v in rows]},
        {
            "label": "90th percentile",
            "color": "#bc4c00",
            "points": [(x, _quantile(v, 0.9) if v else None) for x, v in rows],
        },
        {"label": "median", "color": "#0969da", "points": [(x, _quantile(v, 0.5) if v else None) for x, v in rows]},
    ]


def _value_at(points: list[tuple[Any, Any]], step: Any) -> float:
    """The value at the selected step (or the last one), for ranking the capabilities worth a chart."""
    vals = [(x, y) for x, y in points if is_number(y)]
    if not vals:
        return -math.inf
    for x, y in vals:
        if x == step:
            return y
    return vals[-1][1]


def _training_charts(traj: list[dict[str, Any]], selected: Any) -> dict[str, Any]:
    """The training section's charts: target, loss, one small chart per constraint, the duals."""
    vline = selected if is_number(selected) else None
    charts: dict[str, Any] = {
        "constraints": [],
        "constraints_aggregate": None,
        "constraints_total": 0,
        "target": None,
        "loss": None,
        "duals": [],
    }
    if not traj:
        return charts
    charts["target"] = _target_chart(traj, vline)
    loss = [(t["step"], t.get("train_loss")) for t in traj]
    if any(is_number(y) for _, y in loss):
        charts["loss"] = line_chart(
            [{"label": "training loss", "points": loss, "color": "#6e7781"}],
            width=480,
            height=210,
            vline=vline,
            y_label="training loss",
        )
    cons = _traj_series(traj, "constraints")
    charts["constraints_total"] = len(cons)
    if cons:
        charts["constraints"], charts["constraints_aggregate"] = _constraint_charts(cons, selected, vline)
    charts["duals"] = _dual_charts(traj, vline)
    return charts


def _target_chart(traj: list[dict[str, Any]], vline: Any) -> dict[str, Any] | None:
    target = [(t["step"], t.get("target_metric")) for t in traj]
    if not any(is_number(y) for _, y in target):
        return None
    lines = [{"label": "target metric", "points": target, "dots": len(traj) <= 40}]
    calibrated = [(t["step"], t.get("target_calibrated")) for t in traj]
    if any(is_number(y) for _, y in calibrated):  # optimize.calibrate: the selection score beside the raw one
        lines.append(
            {
                "label": "with the calibrated offset",
                "points": calibrated,
                "color": "#1a7f37",
                "dots": len(traj) <= 40,
            }
        )
    return line_chart(lines, width=480, height=210, vline=vline, y_label="target metric")


def _constraint_charts(
    cons: dict[str, list], selected: Any, vline: Any
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One small chart per constraint (the worst at the selected step first when they do not all fit,
    with an aggregate chart of all of them then)."""
    aggregate = None
    ranked = sorted(cons, key=lambda k: -_value_at(cons[k], selected))
    if len(cons) > MAX_SMALL_MULTIPLES:
        aggregate = line_chart(
            _aggregate_series(cons),
            width=1000,
            height=240,
            vline=vline,
            hlines=[(0.0, "limit (0)", "#cf222e")],
            y_label="L_k(new) - L_k(old) - slack",
        )
        ranked = ranked[:MAX_SMALL_MULTIPLES]
    else:
        ranked = list(cons)  # spec order when all of them fit
    out: list[dict[str, Any]] = []
    for name in ranked:
        pts = cons[name]
        at = _value_at(pts, selected)
        out.append(
            {
                "name": name,
                "at_selected": at if math.isfinite(at) else None,
                "steps_above": sum(1 for _, y in pts if is_number(y) and y > 0),
                "evals": len(pts),
                "chart": line_chart(
                    [{"label": name, "points": pts, "color": "#0969da"}],
                    width=240,
                    height=140,
                    vline=vline,
                    hlines=[(0.0, "", "#cf222e")],
                ),
            }
        )
    return out, aggregate


def _dual_charts(traj: list[dict[str, Any]], vline: Any) -> list[dict[str, Any]]:
    out = []
    for key, label in (("u", "moving-average constraint estimates u_k"), ("multipliers", "Lagrange multipliers")):
        ser = _traj_series(traj, key)
        if not ser:
            continue
        if len(ser) > MAX_LINES_PER_CHART:
            lines, legend_note = _aggregate_series(ser), f"aggregated over {len(ser)} capabilities"
        else:
            lines = [{"label": k, "points": v} for k, v in ser.items()]
            legend_note = ""
        chart = line_chart(
            lines,
            width=1000,
            height=240,
            vline=vline,
            y_label=label,
            hlines=[(0.0, "", "#8c959f")] if key == "u" else (),
        )
        out.append({"title": label, "chart": chart, "note": legend_note})
    return out


def _target_view(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The target's block with every optional field present, and its goal."""
    target = dict(r["target"])
    for key in ("n", "confidence", "improvement_interval", "new_accuracy_interval", "improvement"):
        target.setdefault(key, None)
    target.setdefault("goal_met_with_confidence", None)
    if not is_number(target["improvement"]):
        target["improvement"] = sub(target.get("new_accuracy"), target.get("old_accuracy"))
    goal = {"min_accuracy": None, "min_improvement": None, **(target.get("goal") or {})}
    return target, goal


def _accuracy_rows(per_class_rows: list[dict[str, Any]], status_of: dict, target_class: str) -> list[dict[str, Any]]:
    """Per-class accuracy chart rows, with Wilson bars from the counts."""
    rows = []
    for pc in per_class_rows:
        n = pc["n"]
        row: dict[str, Any] = {"label": pc["class"], "old": pc.get("old_accuracy"), "new": pc.get("new_accuracy")}
        for side in ("old", "new"):
            acc = row[side]
            ci = wilson_interval(round(acc * n), n) if is_number(acc) else None
            row[f"{side}_lo"], row[f"{side}_hi"] = ci if ci else (acc, acc)
        status = status_of.get(pc["class"])
        row["color"] = STATUS_COLORS.get(status, STATUS_COLORS[None])
        row["tag"] = "target" if pc["class"] == target_class else (status or "not protected")
        row["tooltip"] = (
            f"{pc['class']} ({row['tag']}): {pct(row['old'])} -> {pct(row['new'])}, n={n}; "
            f"95% Wilson old [{pct(row['old_lo'])}, {pct(row['old_hi'])}], "
            f"new [{pct(row['new_lo'])}, {pct(row['new_hi'])}]"
        )
        rows.append(row)
    return rows


def _accuracy_charts(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(scatter, interval chart): with many classes a scatter of all and intervals of the worst only."""
    if len(rows) <= MAX_ROWS_PER_CHART:
        return None, interval_chart(rows) if rows else None
    scatter = scatter_chart(
        [{"old": x["old"], "new": x["new"], "color": x["color"], "tooltip": x["tooltip"]} for x in rows]
    )
    worst = sorted((x for x in rows if is_number(x["old"]) and is_number(x["new"])), key=lambda x: x["new"] - x["old"])[
        :MAX_ROWS_PER_CHART
    ]
    return scatter, interval_chart(worst) if worst else None


def _capability_order(caps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(table order, forest rows). With hundreds of capabilities the ones a reviewer must act on would drown
    in spec order: the table lists them first, and the forest shows those nearest or past the tolerance."""
    if len(caps) <= MAX_ROWS_PER_CHART:
        return caps, caps

    def margin(c: dict[str, Any]) -> float:
        b = c["drop_upper_bound"]
        return (b - c["tolerance"]) if is_number(b) else math.inf

    table = [c for c in caps if not c["meets"]] + [c for c in caps if c["meets"]]
    return table, sorted(caps, key=margin, reverse=True)[:MAX_ROWS_PER_CHART]


#: Classes drawn in the lineage chart: the ones that lost most against their best release, the target first.
MAX_LINEAGE_CLASSES = 10


def _lineage_view(r: dict[str, Any]) -> dict[str, Any] | None:
    """The lineage section: the chain of releases ending in this run, each class's accuracy across them (on
    this cycle's held-out split) and the budgets used and left."""
    lin = r.get("lineage")
    if not lin:
        return None
    ancestors = list(lin.get("ancestors") or ())
    release = lin.get("release")
    models = [a["label"] for a in ancestors] or ["origin"]
    chain = [{"label": a["label"], "digest": a["digest"], "this": False} for a in ancestors]
    new_digest = ((r.get("provenance") or {}).get("new_model") or {}).get("digest")
    chain.append(
        {
            "label": f"release {release['id']}" if release else "this run (not registered)",
            "digest": new_digest,
            "this": True,
        }
    )
    acc = lin.get("accuracy") or {}
    order = [*models, "new"]
    target = (r.get("target") or {}).get("class")
    per_class: dict[str, list[Any]] = {}
    for cls in r.get("classes") or ():
        per_class[cls] = [(acc.get(m) or {}).get(cls) for m in order]

    def loss(cls: str) -> float:
        ys = [y for y in per_class[cls][:-1] if is_number(y)]
        new = per_class[cls][-1]
        return max(ys) - new if ys and is_number(new) else -1.0

    shown = sorted((c for c in per_class if c != target), key=loss, reverse=True)[: MAX_LINEAGE_CLASSES - 1]
    if target in per_class:
        shown = [target, *shown]
    series: list[dict[str, Any]] = [
        {"label": cls, "points": list(enumerate(per_class[cls])), "dots": True, "width": 2.4 if cls == target else 1.4}
        for cls in shown
    ]
    drawable = any(is_number(y) for cls in shown for y in per_class[cls])
    chart = (
        line_chart(
            series, width=640, height=240, y_unit="%", x_label="release (last: this run)", y_label="accuracy (%)"
        )
        if drawable
        else None
    )
    return {
        "dir": lin.get("dir"),
        "chain": chain,
        "models": order,
        "chart": chart,
        "shown": len(shown),
        "n_classes": len(per_class),
        "carried": list(lin.get("carried") or ()),
        "budgets": list(lin.get("budgets") or ()),
        "registration": lin.get("registration"),
    }


def _baseline_views(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for b in r.get("baselines") or ():
        bt = b.get("target") or {}
        out.append(
            {
                "method": b["method"],
                "verdict": b.get("verdict"),
                "error": b.get("error"),
                "caps": {c["name"]: c for c in b.get("capabilities") or ()},
                "target_old": bt.get("old_accuracy"),
                "target_new": bt.get("new_accuracy"),
                "goal_met": bt.get("goal_met"),
            }
        )
    return out


def _class_table(
    per_class_rows: list[dict[str, Any]], caps: list[dict[str, Any]], status_of: dict, target_class: str
) -> list[dict[str, Any]]:
    """The appendix's per-class table: every class, with its role."""
    cap_of = {cls: c["name"] for c in caps for cls in c["classes"]}
    table = []
    for pc in per_class_rows:
        cls = pc["class"]
        table.append(
            {
                "cls": cls,
                "role": "target" if cls == target_class else ("protected" if cls in cap_of else "not protected"),
                "capability": cap_of.get(cls, ""),
                "n": pc["n"],
                "old": pc.get("old_accuracy"),
                "new": pc.get("new_accuracy"),
                "change": sub(pc.get("new_accuracy"), pc.get("old_accuracy")),
                "old_loss": pc.get("old_loss"),
                "new_loss": pc.get("new_loss"),
                "neg": pc.get("negative_flips"),
                "pos": pc.get("positive_flips"),
                "status": status_of.get(cls),
            }
        )
    return table


def _confusion(r: dict[str, Any]) -> dict[str, Any] | None:
    data = r.get("confusion") or {}
    if r.get("classes") and isinstance(data.get("old"), list) and isinstance(data.get("new"), list):
        return heatmap(list(r["classes"]), data["old"], data["new"])
    return None


def build_context(run: RunData) -> dict[str, Any]:
    """Everything the template shows, as plain numbers and strings (no markup)."""
    r = run.result
    require = r.get("require", "certified")
    caps = [_norm_capability(c, require, i) for i, c in enumerate(r["capabilities"])]
    for c in caps:
        c["needed_text"] = _needed_text(c)
    spec = r.get("spec") or {}
    target, goal = _target_view(r)
    target_class = target["class"]
    per_class_rows = list(r.get("per_class") or ())
    status_of = _class_status(r["capabilities"])
    rows = _accuracy_rows(per_class_rows, status_of, target_class)
    scatter, interval = _accuracy_charts(rows)
    table_caps, forest_caps = _capability_order(caps)
    selection = {"step": None, "reason": None, "fell_back_to_old": False, **(r.get("selection") or {})}
    training = {"steps": None, "seconds": None, **(r.get("training") or {})}
    prov = r.get("provenance") or {}
    return {
        "caps": caps,
        "table_caps": table_caps,
        "table_reordered": table_caps is not caps,
        "n_protected_classes": len({cls for c in caps for cls in c["classes"]}),
        "counts": {s: sum(1 for c in caps if c["status"] == s) for s in STATUSES},
        "met": sum(1 for c in caps if c["meets"]),
        "require": require,
        "verdict": r["verdict"],
        "certified": r["verdict"] == "certified",
        "not_met": [c for c in caps if not c["meets"]],
        "spec": {k: spec.get(k) for k in ("name", "title", "description", "path", "digest", "text")},
        "title": spec.get("title") or spec.get("name") or "safespec run",
        "method": r["method"],
        "target": target,
        "goal": goal,
        "target_class": target_class,
        "interval": interval,
        "scatter": scatter,
        "many_classes": len(rows) > MAX_ROWS_PER_CHART,
        "n_classes": len(rows),
        "forest": forest_chart(forest_caps) if forest_caps else None,
        "forest_partial": len(forest_caps) < len(caps),
        "charts": _training_charts(run.trajectory, selection.get("step")),
        "trajectory_len": len(run.trajectory),
        "trajectory_name": training.get("trajectory") or "trajectory.jsonl",
        "flip_groups": _flip_groups(run, {pc["class"]: pc for pc in per_class_rows}, target_class),
        "n_flips": len(r.get("flips") or ()),
        "baselines": _baseline_views(r),
        "lineage": _lineage_view(r),
        "selection": selection,
        "training": training,
        "class_table": _class_table(per_class_rows, caps, status_of, target_class),
        "confusion": _confusion(r),
        "statistics": r.get("statistics") or {},
        "prov": prov,
        "old_model": prov.get("old_model") or {},
        "new_model": prov.get("new_model") or {},
        "data_digests": prov.get("data") or {},
        "versions": prov.get("versions") or {},
        "confidences": sorted({c["confidence"] for c in caps}),
        "tolerances": sorted({c["tolerance"] for c in caps}),
        "status_colors": STATUS_COLORS,
        "statuses": STATUSES,
        "display_confidence": DISPLAY_CONFIDENCE,
        "run_dir_name": run.run_dir.resolve().name,
    }
