"""Exact (Clopper-Pearson) intervals for one binomial proportion."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.stats import beta as _beta


# --------------------------------------------------------------------------------------- Clopper-Pearson
def clopper_pearson(k: int, n: int, confidence: float, side: Literal["lower", "upper"]) -> float:
    """Exact one-sided Clopper-Pearson bound for a binomial proportion ``k / n``.

    Used for the new model's accuracy (lower bound) and the negative-flip rate ``b / n`` (upper bound), where an
    exact, never-anticonservative bound is what a reviewer expects. ``n == 0`` gives the vacuous bound.
    """
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, (bool, np.bool_)) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {v!r}")
    k, n = int(k), int(n)
    if k > n:
        raise ValueError(f"k={k} exceeds n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    if side == "lower":
        return 0.0 if k == 0 else float(_beta.ppf(alpha, k, n - k + 1))
    if side == "upper":
        return 1.0 if k == n else float(_beta.ppf(1.0 - alpha, k + 1, n - k))
    raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")


def clopper_pearson_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval (each tail ``(1 - confidence) / 2``)."""
    one = 0.5 + confidence / 2.0
    return clopper_pearson(k, n, one, "lower"), clopper_pearson(k, n, one, "upper")
