"""The run directory's fail-closed state machine: ``state.json`` says ``running`` first (and stale outputs
of an earlier run are removed), ``complete`` last; any failure or interrupt leaves ``failed`` with the reason
and none of result.json, report.html or junit.xml. Nothing in a run directory can claim certification
unless the whole cycle finished."""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path

from .distributed import context as dist_context
from .errors import SafespecError, atomic_write_json

OUTPUTS = ("result.json", "report.html", "junit.xml")


def utc_now() -> str:
    """The time now, ISO-8601 in UTC to the second, as the run directory records it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """The run directory and its fail-closed state machine. Under torchrun only rank 0 writes it (the
    other ranks compute the same result and return it, for their exit code)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.writes = dist_context().is_main

    def start(self, command: str) -> None:
        self.started = utc_now()
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.clear_outputs()
        atomic_write_json(self.path / "state.json", {"state": "running", "started": self.started, "command": command})

    def clear_outputs(self) -> None:
        for name in OUTPUTS:  # result.json, report.html, junit.xml
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "flips", ignore_errors=True)

    def fail(self, reason: str) -> None:
        if not self.writes:
            return
        self.clear_outputs()
        atomic_write_json(
            self.path / "state.json",
            {"state": "failed", "reason": reason, "started": getattr(self, "started", None), "failed": utc_now()},
        )

    def complete(self, verdict: str) -> None:
        if not self.writes:
            return
        atomic_write_json(
            self.path / "state.json",
            {"state": "complete", "verdict": verdict, "started": self.started, "finished": utc_now()},
        )


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SafespecError):
        return str(exc).splitlines()[0]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
