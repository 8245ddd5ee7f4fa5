"""What a result was computed with: the versions of safespec, Python and the packages whose code decides
the numbers. One function, used by the run's provenance and by a demo world's world.json."""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform

from . import __version__


def versions() -> dict[str, str]:
    """Package versions as installed (a package that is missing is left out). A copy: callers may edit it."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    # read once per process: the installed metadata's lookup costs more than a small verify's certificate,
    # and the code a process runs is the code it imported
    out = {"safespec": __version__, "python": platform.python_version()}
    for name, dist in (
        ("torch", "torch"),
        ("open_clip", "open_clip_torch"),
        ("numpy", "numpy"),
        ("pydantic", "pydantic"),
        ("scipy", "scipy"),
    ):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
