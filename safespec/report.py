"""The audit outputs of a finished run: ``report.html``, ``junit.xml`` and the terminal summary.

Everything here is rendered from ``result.json`` and the run directory alone (trajectory.jsonl,
flips/*.png): no torch, no spec re-reading, no model. That is what makes a report reproducible and
auditable long after the training environment is gone, and it keeps ``safespec report RUN_DIR`` fast.

Safety properties this module enforces rather than trusts:
- a run whose ``state.json`` says it failed (or never finished) is refused, and a ``result.json`` whose
  verdict contradicts its own capabilities is refused, so no "certified" page is ever rendered from
  something that was not certified;
- every string that came from a spec, a manifest or a file name reaches the page only through Jinja2
  autoescaping (the charts are Jinja macros fed with numbers, not Python-built markup), and the page
  carries no scripts and no external resources;
- thumbnails are embedded only from PNG files inside the run directory (a path in result.json cannot
  pull an arbitrary file of the host into a report that is then shared).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from .errors import RunError, atomic_write_text
from .report_charts import (
    DISPLAY_CONFIDENCE,
    STATUS_COLORS,
    clean,
    conf,
    fmt_int,
    fmt_num,
    forest_chart,
    heatmap,
    interval_chart,
    is_number,
    line_chart,
    pct,
    pp,
    scatter_chart,
    sub,
    wilson_interval,
)

SCHEMA_VERSION = 1
STATUSES = ("certified", "preserved", "violated", "inconclusive")

# Above these sizes the page switches from one mark per item to aggregates plus the worst items, so a
# 364-class spec still gives a report that opens quickly and prints in a sane number of pages.
MAX_ROWS_PER_CHART = 40
MAX_SMALL_MULTIPLES = 24
MAX_LINES_PER_CHART = 10
MAX_THUMBS_PER_CLASS = 12
MAX_THUMB_BYTES = 512 * 1024
SUMMARY_MAX_CAPABILITIES = 20
SUMMARY_MAX_NOT_MET = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class RunData:
    """What a report needs from a run directory, already validated."""

    run_dir: Path
    result: dict[str, Any]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] | None = None


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON: {e.msg}") from None


def _read_state(run_dir: Path, finishing: bool) -> dict[str, Any] | None:
    """A complete run may be reported; a failed or unfinished one never is (fail closed). ``finishing`` is the
    runner rendering the report of the run it is completing: "running" is then expected, "failed" still is not."""
    path = run_dir / "state.json"
    try:
        state = _read_json(path, "the run state")
    except FileNotFoundError:
        return None  # a result.json copied out of its run directory: result.json itself only exists when complete
    if not isinstance(state, dict) or "state" not in state:
        raise RunError(f"{path}: expected an object with a 'state' field (running, failed or complete)")
    kind = state.get("state")
    reason = state.get("reason")
    reason_text = " ".join(str(reason).split()) if reason else "no reason recorded"
    if kind == "failed":
        raise RunError(f"{path}: the run failed ({reason_text}); there is no certified result to report")
    if kind == "running" and not finishing:
        raise RunError(
            f"{path}: the run has not finished (it is still running or was interrupted: {reason_text}); "
            "there is no result to report"
        )
    if kind not in ("complete", "running"):
        raise RunError(f"{path}: state: expected one of running, failed, complete (got {kind!r})")
    return state


def _load_trajectory(run_dir: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluations sorted by step; a resumed run may have logged a step twice, the later entry wins."""
    training = result.get("training") or {}
    name = training.get("trajectory") or "trajectory.jsonl"
    path = _inside(run_dir, name)
    if path is None:
        raise RunError(f"{run_dir / 'result.json'}: training.trajectory: expected a file inside the run directory (got {name!r})")
    if not path.is_file():
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read the trajectory: {e}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{lineno}:{e.colno}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not is_number(obj.get("step")):
            raise RunError(f"{path}:{lineno}: expected an object with a numeric 'step'")
        key = obj["step"]
        if key not in by_step:
            order.append(key)
        by_step[key] = obj
    return [by_step[k] for k in sorted(order)]


def load_run(run_dir: str | os.PathLike, *, finishing: bool = False) -> RunData:
    """Read and validate a finished run directory; any problem is one ``RunError`` line.

    ``finishing=True`` is for the runner only: it has written result.json and renders the report before it
    marks the run complete (state.json is written last), so a "running" state is accepted then."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    state = _read_state(run_dir, finishing)
    path = run_dir / "result.json"
    try:
        result = _read_json(path, "the result")
    except FileNotFoundError:
        raise RunError(f"{path}: not found (the run did not complete, or this is not a run directory)") from None
    if not isinstance(result, dict):
        raise RunError(f"{path}: expected a JSON object (got {type(result).__name__})")
    version = result.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunError(
            f"{path}: schema_version: this safespec reads schema_version {SCHEMA_VERSION} (got {version!r}); "
            "use the safespec release that wrote it"
        )
    problems = validate_result(result)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise RunError(f"{path}: {problems[0]}{more}")
    _check_consistency(path, result)
    return RunData(run_dir=run_dir, result=result, trajectory=_load_trajectory(run_dir, result), state=state)


# ------------------------------------------------------------------------------------ validation
def result_schema() -> dict[str, Any]:
    """The JSON Schema of result.json (schema_version 1), shipped with the package for other tools."""
    try:
        text = resources.files("safespec").joinpath("result_schema.json").read_text(encoding="utf-8")
    except (OSError, FileNotFoundError):
        raise RunError("safespec/result_schema.json is missing from this installation; reinstall safespec") from None
    return json.loads(text)


_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": is_number,
    "integer": lambda v: is_number(v) and float(v).is_integer(),
}


def _validate(value: Any, schema: dict[str, Any], where: str, out: list[str]) -> None:
    """The subset of JSON Schema the result schema uses (type, enum, const, required, properties,
    items, additionalProperties, minimum/maximum, minItems/maxItems): enough to reject what would
    otherwise render as a wrong page, without a jsonschema dependency."""
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: expected {schema['const']!r} (got {value!r})")
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join("null" if e is None else str(e) for e in schema["enum"])
        out.append(f"{where}: expected one of {allowed} (got {value!r})")
        return
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPE_CHECKS[t](value) for t in types):
            got = "null" if value is None else type(value).__name__
            out.append(f"{where}: expected {' or '.join(types)} (got {got})")
            return
    if is_number(value):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: expected at least {schema['minimum']} (got {value!r})")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: expected at most {schema['maximum']} (got {value!r})")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                out.append(f"{where + '.' if where else ''}{key}: required field is missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub_where = f"{where}.{key}" if where else str(key)
            if key in props:
                _validate(child, props[key], sub_where, out)
            elif isinstance(extra, dict):
                _validate(child, extra, sub_where, out)
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(f"{where}: expected at least {schema['minItems']} items (got {len(value)})")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{where}: expected at most {schema['maxItems']} items (got {len(value)})")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(item, schema["items"], f"{where}[{i}]", out)


def validate_result(result: Any) -> list[str]:
    """Problems of a result.json object against the shipped schema, each as ``field.path: message``."""
    out: list[str] = []
    _validate(result, result_schema(), "", out)
    return out


def _required_statuses(require: str) -> tuple[str, ...]:
    return ("certified",) if require == "certified" else ("certified", "preserved")


def _meets(cap: dict[str, Any], require: str) -> bool:
    return cap["status"] in _required_statuses(require)


def _check_consistency(path: Path, result: dict[str, Any]) -> None:
    """A verdict must follow from its capabilities (intersection-union): refuse a self-contradicting file."""
    require = result.get("require", "certified")
    all_meet = True
    for i, cap in enumerate(result["capabilities"]):
        meets = _meets(cap, require)
        declared = cap.get("meets_requirement")
        if declared is not None and declared != meets:
            raise RunError(
                f"{path}: capabilities[{i}].meets_requirement: {declared} contradicts status "
                f"{cap['status']!r} under require {require!r}"
            )
        all_meet &= meets
    if result["verdict"] == "certified" and not all_meet:
        raise RunError(f"{path}: verdict: 'certified' contradicts the capabilities (not every one is {require!r} or better)")
    if result["verdict"] == "not_certified" and all_meet:
        raise RunError(f"{path}: verdict: 'not_certified' contradicts the capabilities (every one meets {require!r})")


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
        per_class.append({
            "cls": pc["class"], "n": pc["n"], "old": pc.get("old_accuracy"), "new": pc.get("new_accuracy"),
            "change": sub(pc.get("new_accuracy"), pc.get("old_accuracy")),
            "neg": pc.get("negative_flips"), "pos": pc.get("positive_flips"),
            "drop_upper_bound": pc.get("drop_upper_bound"), "status": pc.get("status"),
        })
    meets = _meets(c, require)
    return {
        "index": index, "name": c["name"], "classes": list(c["classes"]), "status": c["status"], "meets": meets,
        "tolerance": c["tolerance"], "confidence": c["confidence"], "n": c["n"],
        "old": c.get("old_accuracy"), "new": c.get("new_accuracy"), "change": change,
        "drop_upper_bound": c.get("drop_upper_bound"), "new_accuracy_lower": c.get("new_accuracy_lower"),
        "flip_rate_upper": c.get("flip_rate_upper"), "neg": c.get("negative_flips"), "pos": c.get("positive_flips"),
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


def _inside(run_dir: Path, rel: Any) -> Path | None:
    """The path ``rel`` inside ``run_dir``, or None when it is absolute or escapes it."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    p = Path(rel)
    if p.is_absolute():
        return None
    root = run_dir.resolve()
    full = (root / p).resolve()
    try:
        full.relative_to(root)
    except ValueError:
        return None
    return full


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
            shown.append({"src": _thumbnail(run.run_dir, f.get("path")), "path": f.get("path") or "",
                          "source": f.get("source") or "", "old_pred": f.get("old_pred") or "?",
                          "new_pred": f.get("new_pred") or "?"})
        groups.append({"cls": cls, "is_target": cls == target, "n": pc.get("n"),
                       "neg": pc.get("negative_flips", len(flips)), "pos": pc.get("positive_flips"),
                       "thumbs": shown, "more": max(0, len(flips) - len(shown))})
    groups.sort(key=lambda g: -(g["neg"] or 0))
    return groups


def _traj_series(traj: list[dict[str, Any]], key: str) -> dict[str, list[tuple[Any, Any]]]:
    """Per-name series of a dict-valued trajectory field (constraints, u, multipliers, val_accuracy)."""
    names: list[str] = []
    for t in traj:
        for k in (t.get(key) or {}):
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
        {"label": "90th percentile", "color": "#bc4c00", "points": [(x, _quantile(v, 0.9) if v else None) for x, v in rows]},
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
    vline = selected if is_number(selected) else None
    charts: dict[str, Any] = {"constraints": [], "constraints_aggregate": None, "constraints_total": 0,
                              "target": None, "loss": None, "duals": []}
    if not traj:
        return charts
    target = [(t["step"], t.get("target_metric")) for t in traj]
    if any(is_number(y) for _, y in target):
        lines = [{"label": "target metric", "points": target, "dots": len(traj) <= 40}]
        calibrated = [(t["step"], t.get("target_calibrated")) for t in traj]
        if any(is_number(y) for _, y in calibrated):  # optimize.calibrate: the selection score beside the raw one
            lines.append({"label": "with the calibrated offset", "points": calibrated, "color": "#1a7f37",
                          "dots": len(traj) <= 40})
        charts["target"] = line_chart(lines, width=480, height=210, vline=vline, y_label="target metric")
    loss = [(t["step"], t.get("train_loss")) for t in traj]
    if any(is_number(y) for _, y in loss):
        charts["loss"] = line_chart([{"label": "training loss", "points": loss, "color": "#6e7781"}],
                                    width=480, height=210, vline=vline, y_label="training loss")
    cons = _traj_series(traj, "constraints")
    charts["constraints_total"] = len(cons)
    if cons:
        ranked = sorted(cons, key=lambda k: -_value_at(cons[k], selected))
        if len(cons) > MAX_SMALL_MULTIPLES:
            charts["constraints_aggregate"] = line_chart(
                _aggregate_series(cons), width=1000, height=240, vline=vline,
                hlines=[(0.0, "limit (0)", "#cf222e")], y_label="L_k(new) - L_k(old) - slack")
            ranked = ranked[:MAX_SMALL_MULTIPLES]
        else:
            ranked = list(cons)  # spec order when all of them fit
        for name in ranked:
            pts = cons[name]
            at = _value_at(pts, selected)
            charts["constraints"].append({
                "name": name, "at_selected": at if math.isfinite(at) else None,
                "steps_above": sum(1 for _, y in pts if is_number(y) and y > 0), "evals": len(pts),
                "chart": line_chart([{"label": name, "points": pts, "color": "#0969da"}], width=240, height=140,
                                    vline=vline, hlines=[(0.0, "", "#cf222e")]),
            })
    for key, label in (("u", "moving-average constraint estimates u_k"), ("multipliers", "Lagrange multipliers")):
        ser = _traj_series(traj, key)
        if not ser:
            continue
        if len(ser) > MAX_LINES_PER_CHART:
            agg = _aggregate_series(ser)
            lines, legend_note = agg, f"aggregated over {len(ser)} capabilities"
        else:
            lines = [{"label": k, "points": v} for k, v in ser.items()]
            legend_note = ""
        chart = line_chart(lines, width=1000, height=240, vline=vline, y_label=label,
                           hlines=[(0.0, "", "#8c959f")] if key == "u" else ())
        charts["duals"].append({"title": label, "chart": chart, "note": legend_note})
    return charts


def build_context(run: RunData) -> dict[str, Any]:
    """Everything the template shows, as plain numbers and strings (no markup)."""
    r = run.result
    require = r.get("require", "certified")
    caps = [_norm_capability(c, require, i) for i, c in enumerate(r["capabilities"])]
    for c in caps:
        c["needed_text"] = _needed_text(c)
    counts = {s: sum(1 for c in caps if c["status"] == s) for s in STATUSES}
    met = sum(1 for c in caps if c["meets"])
    spec = r.get("spec") or {}
    target = dict(r["target"])
    target_class = target["class"]
    for key in ("n", "confidence", "improvement_interval", "new_accuracy_interval", "improvement",
                "goal_met_with_confidence"):
        target.setdefault(key, None)
    if not is_number(target["improvement"]):
        target["improvement"] = sub(target.get("new_accuracy"), target.get("old_accuracy"))
    goal = {"min_accuracy": None, "min_improvement": None, **(target.get("goal") or {})}
    per_class_rows = list(r.get("per_class") or ())
    per_class = {pc["class"]: pc for pc in per_class_rows}
    status_of = _class_status(r["capabilities"])

    # Per-class accuracy chart rows (Wilson bars from the counts).
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
        row["tooltip"] = (f"{pc['class']} ({row['tag']}): {pct(row['old'])} -> {pct(row['new'])}, n={n}; "
                          f"95% Wilson old [{pct(row['old_lo'])}, {pct(row['old_hi'])}], "
                          f"new [{pct(row['new_lo'])}, {pct(row['new_hi'])}]")
        rows.append(row)
    many_classes = len(rows) > MAX_ROWS_PER_CHART
    if many_classes:
        scatter = scatter_chart([{"old": x["old"], "new": x["new"], "color": x["color"], "tooltip": x["tooltip"]}
                                 for x in rows])
        worst = sorted((x for x in rows if is_number(x["old"]) and is_number(x["new"])),
                       key=lambda x: x["new"] - x["old"])[:MAX_ROWS_PER_CHART]
        interval = interval_chart(worst) if worst else None
    else:
        scatter = None
        interval = interval_chart(rows) if rows else None

    # With hundreds of capabilities the ones a reviewer must act on would drown in spec order: list them first.
    table_caps = caps if len(caps) <= MAX_ROWS_PER_CHART else (
        [c for c in caps if not c["meets"]] + [c for c in caps if c["meets"]])
    forest_caps = caps
    if len(caps) > MAX_ROWS_PER_CHART:
        def margin(c: dict[str, Any]) -> float:
            b = c["drop_upper_bound"]
            return (b - c["tolerance"]) if is_number(b) else math.inf
        forest_caps = sorted(caps, key=margin, reverse=True)[:MAX_ROWS_PER_CHART]
    forest = forest_chart(forest_caps) if forest_caps else None

    selection = {"step": None, "reason": None, "fell_back_to_old": False, **(r.get("selection") or {})}
    training = {"steps": None, "seconds": None, **(r.get("training") or {})}
    charts = _training_charts(run.trajectory, selection.get("step"))

    baselines = []
    for b in r.get("baselines") or ():
        by_name = {c["name"]: c for c in b.get("capabilities") or ()}
        bt = b.get("target") or {}
        baselines.append({"method": b["method"], "verdict": b.get("verdict"), "error": b.get("error"),
                          "caps": by_name, "target_old": bt.get("old_accuracy"), "target_new": bt.get("new_accuracy"),
                          "goal_met": bt.get("goal_met")})

    # Per-class table (appendix): every class, with its role.
    cap_of = {cls: c["name"] for c in caps for cls in c["classes"]}
    class_table = []
    for pc in per_class_rows:
        cls = pc["class"]
        class_table.append({
            "cls": cls, "role": "target" if cls == target_class else ("protected" if cls in cap_of else "not protected"),
            "capability": cap_of.get(cls, ""), "n": pc["n"], "old": pc.get("old_accuracy"), "new": pc.get("new_accuracy"),
            "change": sub(pc.get("new_accuracy"), pc.get("old_accuracy")), "old_loss": pc.get("old_loss"),
            "new_loss": pc.get("new_loss"), "neg": pc.get("negative_flips"), "pos": pc.get("positive_flips"),
            "status": status_of.get(cls),
        })

    confusion_data = r.get("confusion") or {}
    confusion = None
    if r.get("classes") and isinstance(confusion_data.get("old"), list) and isinstance(confusion_data.get("new"), list):
        confusion = heatmap(list(r["classes"]), confusion_data["old"], confusion_data["new"])

    prov = r.get("provenance") or {}
    confidences = sorted({c["confidence"] for c in caps})
    tolerances = sorted({c["tolerance"] for c in caps})
    trajectory_name = training.get("trajectory") or "trajectory.jsonl"
    return {
        "caps": caps, "table_caps": table_caps, "table_reordered": table_caps is not caps,
        "n_protected_classes": len({cls for c in caps for cls in c["classes"]}), "counts": counts, "met": met, "require": require,
        "verdict": r["verdict"], "certified": r["verdict"] == "certified",
        "not_met": [c for c in caps if not c["meets"]],
        "spec": {k: spec.get(k) for k in ("name", "title", "description", "path", "digest", "text")},
        "title": spec.get("title") or spec.get("name") or "safespec run",
        "method": r["method"], "target": target, "goal": goal, "target_class": target_class,
        "interval": interval, "scatter": scatter, "many_classes": many_classes, "n_classes": len(rows),
        "forest": forest, "forest_partial": len(forest_caps) < len(caps),
        "charts": charts, "trajectory_len": len(run.trajectory), "trajectory_name": trajectory_name,
        "flip_groups": _flip_groups(run, per_class, target_class), "n_flips": len(r.get("flips") or ()),
        "baselines": baselines, "selection": selection, "training": training, "class_table": class_table,
        "confusion": confusion, "statistics": r.get("statistics") or {}, "prov": prov,
        "old_model": prov.get("old_model") or {}, "new_model": prov.get("new_model") or {},
        "data_digests": prov.get("data") or {}, "versions": prov.get("versions") or {},
        "confidences": confidences, "tolerances": tolerances, "status_colors": STATUS_COLORS,
        "statuses": STATUSES, "display_confidence": DISPLAY_CONFIDENCE,
        "run_dir_name": run.run_dir.resolve().name,
    }


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


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: Any) -> str:
    """XML 1.0 cannot carry control characters at all, escaped or not."""
    return _XML_INVALID.sub("\ufffd", str(text))


def _cap_message(c: dict[str, Any]) -> str:
    needed = ""
    if c["status"] != "certified":
        needed = f"; needed n {_needed_text(c)}"
    bound = c.get("drop_upper_bound")
    rel = "<=" if is_number(bound) and bound <= c["tolerance"] else ">"
    return (f"{c['status']}: accuracy {pct(c.get('old_accuracy'))} -> {pct(c.get('new_accuracy'))} "
            f"({pp(c.get('accuracy_change', sub(c.get('new_accuracy'), c.get('old_accuracy'))), 1, True)}); "
            f"drop upper bound {pp(bound, 2)} {rel} tolerance {pp(c['tolerance'], 2)} at {conf(c['confidence'])} "
            f"confidence; n={c['n']}{needed}")


def _target_message(t: dict[str, Any]) -> str:
    goal = t.get("goal") or {}
    parts = []
    if is_number(goal.get("min_accuracy")):
        parts.append(f"accuracy >= {pct(goal['min_accuracy'])}")
    if is_number(goal.get("min_improvement")):
        parts.append(f"improvement >= {pp(goal['min_improvement'], 1, True)}")
    interval = t.get("improvement_interval")
    iv = f" [{pp(interval[0], 1, True)}, {pp(interval[1], 1, True)}]" if interval else ""
    improvement = t.get("improvement", sub(t.get("new_accuracy"), t.get("old_accuracy")))
    return (f"goal {'met' if t['goal_met'] else 'not met'}: accuracy {pct(t.get('old_accuracy'))} -> "
            f"{pct(t.get('new_accuracy'))} ({pp(improvement, 1, True)}{iv}); "
            f"goal {' and '.join(parts) if parts else 'not recorded'}")


def render_junit(result: dict[str, Any]) -> str:
    """One test case per protected capability and one for the target, so CI lists them."""
    require = result.get("require", "certified")
    spec = result.get("spec") or {}
    suite_name = f"safespec.{clean(spec.get('name') or 'run')}"
    caps = result["capabilities"]
    target = result["target"]
    failures = sum(1 for c in caps if not _meets(c, require)) + (0 if target["goal_met"] else 1)
    tests = len(caps) + 1
    prov = result.get("provenance") or {}
    root = ET.Element("testsuites", {"name": "safespec", "tests": str(tests), "failures": str(failures),
                                     "errors": "0", "time": "0"})
    suite = ET.SubElement(root, "testsuite", {"name": _x(suite_name), "tests": str(tests), "failures": str(failures),
                                              "errors": "0", "skipped": "0", "time": "0"})
    if prov.get("finished"):
        suite.set("timestamp", _x(prov["finished"]))
    props = ET.SubElement(suite, "properties")
    for k, v in (("verdict", result["verdict"]), ("require", require), ("method", result.get("method")),
                 ("spec_digest", spec.get("digest") or prov.get("spec_digest"))):
        if v is not None:
            ET.SubElement(props, "property", {"name": k, "value": _x(v)})
    for c in caps:
        case = ET.SubElement(suite, "testcase", {"classname": _x(f"{suite_name}.protected"),
                                                 "name": _x(clean(c["name"])), "time": "0"})
        msg = _x(_cap_message(c))
        if _meets(c, require):
            ET.SubElement(case, "system-out").text = msg
        else:
            fail = ET.SubElement(case, "failure", {"message": msg, "type": _x(c["status"])})
            fail.text = msg + f"\nrequired: every protected capability {require}" + (
                " or certified" if require == "preserved" else "")
    case = ET.SubElement(suite, "testcase", {"classname": _x(f"{suite_name}.target"),
                                             "name": _x(f"target {clean(target['class'])}"), "time": "0"})
    msg = _x(_target_message(target))
    if target["goal_met"]:
        ET.SubElement(case, "system-out").text = msg
    else:
        ET.SubElement(case, "failure", {"message": msg, "type": "goal_not_met"}).text = msg
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_ANSI = {"certified": "\x1b[32m", "preserved": "\x1b[33m", "violated": "\x1b[31m", "inconclusive": "\x1b[35m",
         "bold": "\x1b[1m", "reset": "\x1b[0m", "dim": "\x1b[2m"}


def summary_text(result: dict[str, Any], color: bool = False) -> str:
    """The one-screen terminal summary: the verdict, then one line per capability and the target."""
    def paint(text: str, style: str) -> str:
        return f"{_ANSI[style]}{text}{_ANSI['reset']}" if color else text

    require = result.get("require", "certified")
    caps = result["capabilities"]
    met = [c for c in caps if _meets(c, require)]
    not_met = [c for c in caps if not _meets(c, require)]
    spec = result.get("spec") or {}
    verdict = result["verdict"]
    head = "CERTIFIED" if verdict == "certified" else "NOT CERTIFIED"
    style = "certified" if verdict == "certified" else "violated"
    if verdict == "certified" and not (result.get("target") or {}).get("goal_met"):
        head, style = "CERTIFIED, TARGET GOAL NOT MET (not releasable)", "preserved"
    first = f"{paint('safespec:', 'bold')} {paint(head, style)}"
    first += (f"  {clean(spec.get('name') or 'run', 40)}: {len(met)} of {len(caps)} protected capabilities "
              f"{require}{' or better' if require == 'preserved' else ''} (method {result.get('method')})")
    lines = [first]
    if len(caps) > SUMMARY_MAX_CAPABILITIES:
        shown = not_met[:SUMMARY_MAX_NOT_MET]
    else:
        shown = caps
    width = min(28, max([len(clean(c["name"])) for c in shown] + [len(clean(result["target"]["class"])), 6]))
    for c in shown:
        status = c["status"]
        name = clean(c["name"], width).ljust(width)
        bound = c.get("drop_upper_bound")
        rel = "<=" if is_number(bound) and bound <= c["tolerance"] else "> "
        change = c.get("accuracy_change", sub(c.get("new_accuracy"), c.get("old_accuracy")))
        line = (f"  {paint(status.ljust(12), status)} {name}  {pct(c.get('old_accuracy')):>6} -> "
                f"{pct(c.get('new_accuracy')):>6} ({pp(change, 1, True):>9})  drop bound "
                f"{pp(bound, 2):>8} {rel} tol {pp(c['tolerance'], 2)}  n={c['n']}")
        if status != "certified":
            line += f"  needed n={_needed_text(c, short=True)}"
        lines.append(line)
    if len(caps) > SUMMARY_MAX_CAPABILITIES:
        if len(not_met) > len(shown):
            lines.append(f"  ... and {len(not_met) - len(shown)} more not {require}")
        by_status = ", ".join(f"{sum(1 for c in met if c['status'] == s)} {s}" for s in STATUSES
                              if any(c["status"] == s for c in met))
        lines.append(f"  + {len(met)} more meeting the requirement ({by_status or 'none'})" if met else
                     "  (no capability meets the requirement)")
    t = result["target"]
    goal_word = "goal met" if t["goal_met"] else "goal NOT met"
    interval = t.get("improvement_interval")
    iv = f" [{pp(interval[0], 1, True)}, {pp(interval[1], 1, True)}]" if interval else ""
    improvement = t.get("improvement", sub(t.get("new_accuracy"), t.get("old_accuracy")))
    lines.append(f"  {paint('target'.ljust(12), 'bold')} {clean(t['class'], width).ljust(width)}  "
                 f"{pct(t.get('old_accuracy')):>6} -> {pct(t.get('new_accuracy')):>6} "
                 f"({pp(improvement, 1, True):>9}){iv}  "
                 f"{paint(goal_word, 'certified' if t['goal_met'] else 'violated')}")
    sel = result.get("selection") or {}
    blocked = sel.get("blocked") or {}
    if sel.get("fell_back_to_old") or (sel.get("step") == 0 and blocked.get("summary")):
        what = "kept the old model" if sel.get("fell_back_to_old") else "kept the old model with a target offset"
        lines.append(f"  {paint('selection', 'bold')}: {what}"
                     + (f": {clean(blocked['summary'], 400)}" if blocked.get("summary") else ""))
    return "\n".join(lines)


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
