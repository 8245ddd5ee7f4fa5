"""The architecture registry: the model configs safespec ships (tiny ViTs for the demo world and the tests),
registered with open_clip so that their names work wherever an open_clip name does, and the check of an
architecture name (with a did-you-mean)."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterable
from pathlib import Path

from .._compat import import_open_clip
from ..errors import ModelError

open_clip = import_open_clip()  # open_clip only after the torchvision fix


SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


# ------------------------------------------------------------------------------------------ registry
def register_shipped_configs() -> tuple[str, ...]:
    """Make the configs shipped in ``safespec/model_configs`` known to open_clip by name (idempotent)."""
    names = tuple(sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json")))
    known = set(open_clip.list_models())
    if any(n not in known for n in names):
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)
    return names


SHIPPED_ARCHS: tuple[str, ...] = register_shipped_configs()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger ("initialized randomly", download chatter); safespec reports
    what it loaded itself, so these lines would only be noise in a CLI run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _close(name: str, options: Iterable[str], n: int = 5) -> str:
    opts = list(options)
    close = difflib.get_close_matches(name, opts, n=n, cutoff=0.5)
    if not close:
        close = [o for o in opts if name.lower().split("-")[0] in o.lower()][:n]
    return ", ".join(close)


def _check_arch(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch) if not arch.startswith(("hf-hub:", "local-dir:")) else None
    if cfg is None:
        near = _close(arch, open_clip.list_models())
        hint = f"; did you mean {near}?" if near else f"; shipped configs: {', '.join(SHIPPED_ARCHS)}"
        raise ModelError(f"model.arch: unknown open_clip architecture {arch!r}{hint}")
    return cfg
