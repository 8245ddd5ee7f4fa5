"""What every statistic here shares: the tests' names, argument checks and numerical tolerances."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.stats import norm as _norm

# Root-finding tolerance on the drop scale. Bounds are reported to 4 decimals; 1e-12 keeps the bound/p-value
# equivalence exact except for tables constructed to sit on the margin to 12 digits.
_XTOL = 1e-12
# The open end of the parameter space: at delta = +-1 the null variance vanishes and the statistic is infinite.
_EDGE = 1e-12

Test = Literal["exact", "score"]
#: The tests a certificate can use: the exact unconditional test and Tango's asymptotic score test.
TESTS: tuple[str, ...] = ("exact", "score")
DEFAULT_TEST: Test = "exact"
#: Berger-Boos gamma of the exact test: the nuisance rate p_c is maximised over a (1 - gamma) Clopper-Pearson
#: interval and gamma is added to the p-value. 0.001 costs 0.1 point of the 5% level; below a level of 1% it is
#: alpha / 10 instead (see :func:`exact_gamma`), so that every confidence below 1 can still certify.
EXACT_GAMMA = 1e-3


# ------------------------------------------------------------------------------------------------ checks
def _check_confidence(confidence: float, *, one_sided: bool) -> None:
    lo = 0.5 if one_sided else 0.0
    if not (lo < float(confidence) < 1.0):
        side = "one-sided" if one_sided else "two-sided"
        raise ValueError(f"{side} confidence must lie in ({lo}, 1), got {confidence!r}")


def _check_table(b: int, c: int, n: int) -> tuple[int, int, int]:
    for name, v in (("b", b), ("c", c), ("n", n)):
        if isinstance(v, (bool, np.bool_)) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {v!r}")
    b, c, n = int(b), int(c), int(n)
    if b + c > n:
        raise ValueError(f"discordant counts b={b} + c={c} exceed n={n}")
    return b, c, n


def _check_test(test: str) -> None:
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")


def _check_margin(margin: float, lo: float = 0.0) -> float:
    if isinstance(margin, (bool, np.bool_)) or not lo <= float(margin) <= 1.0:
        raise ValueError(f"margin must lie in [{lo:g}, 1], got {margin!r}")
    return float(margin)


def z_value(confidence: float) -> float:
    """Standard normal quantile of a one-sided ``confidence`` (1.6449 for 0.95)."""
    return float(_norm.ppf(confidence))
