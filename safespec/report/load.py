"""Reading a finished run back: result.json (validated against its schema and its own verdict), state.json
and the trajectory. The report renders from what this returns and nothing else."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..result import SCHEMA_VERSION, STATUSES, Result, json_schema, meets, parse_result, validate_result
from .charts import is_number

__all__ = ["SCHEMA_VERSION", "STATUSES", "RunData", "load_run", "meets", "result_schema", "validate_result"]


# ------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class RunData:
    """What a report needs from a run directory, already validated."""

    run_dir: Path
    result: dict[str, Any]  # as written (what the renderers read)
    typed: Result  # the same, checked and typed
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
    try:
        typed = parse_result(result)  # the schema, and a verdict that follows from its capabilities
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None
    return RunData(
        run_dir=run_dir, result=result, typed=typed, trajectory=_load_trajectory(run_dir, result), state=state
    )


# ------------------------------------------------------------------------------------ validation
def result_schema() -> dict[str, Any]:
    """The JSON Schema of result.json (schema_version 1), generated from :mod:`safespec.result`; the same
    text ships as ``safespec/result_schema.json`` for other tools."""
    return json_schema()


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
