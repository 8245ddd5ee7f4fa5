"""Reading a finished run back: result.json (validated against its schema and its own verdict), state.json
and the trajectory. The report renders from what this returns and nothing else."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import RunError
from .charts import (
    is_number,
)

SCHEMA_VERSION = 1
STATUSES = ("certified", "preserved", "violated", "inconclusive")


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
        raise RunError(
            f"{run_dir / 'result.json'}: training.trajectory: expected a file inside the run directory (got {name!r})"
        )
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
        raise RunError(
            f"{path}: verdict: 'certified' contradicts the capabilities (not every one is {require!r} or better)"
        )
    if result["verdict"] == "not_certified" and all_meet:
        raise RunError(f"{path}: verdict: 'not_certified' contradicts the capabilities (every one meets {require!r})")


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
