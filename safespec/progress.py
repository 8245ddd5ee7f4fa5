"""Progress reporting that is a live bar for people and a sparse log for machines.

A bar (rate, ETA, and a caller-supplied status such as the worst constraint value) on an interactive
terminal; in CI (``CI`` set), with ``--quiet`` or when stderr is not a TTY, one plain line every few
percent instead, so logs stay short and still show that the run is alive.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm


def interactive_default() -> bool:
    return not os.environ.get("CI") and sys.stderr.isatty()


class Progress:
    """``with Progress(total, "train", quiet=...) as p: p.update(1, status="worst u=+0.01")``."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        quiet: bool = False,
        bar: bool | None = None,
        log: Callable[[str], None] | None = None,
        every_percent: int = 10,
        initial: int = 0,
    ):
        self.total = max(int(total), 1)
        self.desc = desc
        self.quiet = quiet
        self.bar_on = (interactive_default() if bar is None else bar) and not quiet
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.every = max(1, self.total * every_percent // 100)
        self.n = initial
        self._next_log = (initial // self.every + 1) * self.every
        self._t0 = time.perf_counter()
        self._n0 = initial
        self._bar = (
            tqdm(total=self.total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
            if self.bar_on
            else None
        )

    def update(self, k: int = 1, status: str | None = None) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
            if status:
                self._bar.set_postfix_str(status, refresh=False)
        elif not self.quiet and (self.n >= self._next_log or self.n == self.total):
            while self._next_log <= self.n:
                self._next_log += self.every
            dt = time.perf_counter() - self._t0
            rate = (self.n - self._n0) / dt if dt > 0 else 0.0
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            extra = f" {status}" if status else ""
            self.log(
                f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%) "
                f"{rate:.2f} {'step'}/s ETA {eta:.0f}s{extra}"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
