"""User-facing errors and atomic writes.

A safety tool must fail closed and legibly: every error a user can cause is a :class:`SafespecError`
whose message is one line naming the file and line (or row) and what was expected. The CLI prints it
and exits 2; nothing else ever reaches the user as a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class SafespecError(Exception):
    """An error the user can act on. ``str(err)`` may hold several lines, one per problem."""

    exit_code = 2


class SpecError(SafespecError):
    """The spec file is malformed or invalid; one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class DataError(SafespecError):
    """A manifest, image or data file is missing or malformed (names the file and row)."""


class ModelError(SafespecError):
    """A model, checkpoint or weight source cannot be loaded or does not match the spec."""


class RunError(SafespecError):
    """A run directory or training state is unusable (e.g. a resume checkpoint that does not match)."""


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, and for that instant every file another thread creates
    would be world-writable; Linux reports it in /proc, so the set-and-restore is only the fallback."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write then rename, so a reader never sees a half-written file and an interrupt leaves the old one.

    The temporary file is created private (0600), and that mode would survive the rename: an audit
    report that a teammate or a CI artifact step cannot read. It is given the mode a plain ``open``
    would have given it (0666 less the umask) before it is renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX; elsewhere mkstemp's mode is the platform default
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")
