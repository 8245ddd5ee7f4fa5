"""Tango's score test for a paired difference of proportions (non-inferiority at a margin), its bound
and interval, and the Wald bound it improves on."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize
from scipy.stats import norm as _norm

from .base import _EDGE, _XTOL, _check_confidence, _check_table, z_value


# ------------------------------------------------------------------------------------- Tango's score test
def restricted_mle(b, c, n, delta):
    """Maximum-likelihood estimate of the positive-flip rate ``p_c`` when the drop is constrained to ``delta``.

    Under ``p_b = p_c + delta`` the likelihood's stationarity condition is the quadratic
    ``2n p^2 + (-(b + c) + (2n - b + c) delta) p - c delta (1 - delta) = 0`` (Tango 1998, eq. 5); the feasible
    maximiser is its larger root. The root is taken in the cancellation-free form so that tiny rates
    (a few flips in thousands of images) are not lost to rounding. Vectorised over all arguments; ``b``, ``c``,
    ``n`` may be expected (fractional) counts, which is what the sample-size formula needs.
    """
    b, c, n, delta = (np.asarray(x, dtype=float) for x in (b, c, n, delta))
    A = 2.0 * n
    B = -(b + c) + (2.0 * n - b + c) * delta
    C = -c * delta * (1.0 - delta)
    disc = np.sqrt(np.maximum(B * B - 4.0 * A * C, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        # (-B + disc) / 2A loses every digit when B > 0 and |AC| << B^2; 2C / (-B - disc) is the same root.
        root = np.where(B <= 0, (-B + disc) / (2.0 * A), 2.0 * C / (-B - disc))
    root = np.where(np.isfinite(root), root, 0.0)
    # Feasibility: p_c >= 0 and p_b = p_c + delta >= 0 (rounding can leave a hair outside).
    return np.maximum(root, np.maximum(-delta, 0.0))


def score_statistic(b, c, n, delta):
    """Tango's score statistic for ``H: p_b - p_c = delta``: ``(b - c - n delta) / sqrt(n (2 p~_c + delta (1 - delta)))``.

    Large negative values say the true drop is smaller than ``delta``. Where the null variance is zero (only at
    a table without discordant pairs tested at ``delta = 0``, or at ``delta = +-1``) the statistic is 0 when the
    numerator is 0 and +-inf otherwise, the limits of the formula. Vectorised.
    """
    b, c, n, delta = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (b, c, n, delta)))
    p = restricted_mle(b, c, n, delta)
    num = b - c - n * delta
    var = n * (2.0 * p + delta * (1.0 - delta))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / np.sqrt(np.maximum(var, 0.0))
    t = np.where(var > 0, t, np.where(num == 0, 0.0, np.copysign(np.inf, num)))
    return t if t.ndim else float(t)


def _score_scalar(b: float, c: float, n: float, delta: float) -> float:
    """:func:`score_statistic` for one table in plain float arithmetic, the same operations in the same order
    (so the same bits): the bound's root-finding calls it a dozen times per table, where numpy's per-call
    overhead on scalars was most of a certificate's time."""
    A = 2.0 * n
    B = -(b + c) + (2.0 * n - b + c) * delta
    C = -c * delta * (1.0 - delta)
    disc = math.sqrt(max(B * B - 4.0 * A * C, 0.0))
    root = (-B + disc) / (2.0 * A) if B <= 0 else 2.0 * C / (-B - disc)  # -B - disc < 0 when B > 0
    if not math.isfinite(root):
        root = 0.0
    p = max(root, max(-delta, 0.0))
    num = b - c - n * delta
    var = n * (2.0 * p + delta * (1.0 - delta))
    if var > 0:
        return num / math.sqrt(var)
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def _upper(b: int, c: int, n: int, z: float) -> float:
    """Largest drop ``delta`` that the one-sided score test at critical value ``z`` does not reject."""
    if n == 0:
        return 1.0  # nothing observed: the vacuous bound
    if b == n:
        return 1.0
    lo = (b - c) / n  # the statistic is 0 here, >= -z
    hi = 1.0 - _EDGE
    bf, cf, nf = float(b), float(c), float(n)
    f = lambda d: _score_scalar(bf, cf, nf, d) + z  # noqa: E731  (decreasing in d)
    if f(hi) >= 0:
        return 1.0
    if f(lo) <= 0:  # z == 0 only
        return lo
    return float(optimize.brentq(f, lo, hi, xtol=_XTOL, rtol=4 * np.finfo(float).eps, maxiter=500))


def drop_upper_bound(b: int, c: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for the true accuracy drop ``p_old - p_new`` (Tango score interval).

    Tango's test (``certify.test: score``) certifies at margin ``eps`` exactly when this bound is <= ``eps``.
    Returns 1.0 (vacuous) when ``n == 0`` or every image flipped from right to wrong.
    """
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=True)
    return _upper(b, c, n, z_value(confidence))


def drop_lower_bound(b: int, c: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound for the drop. Swapping ``b`` and ``c`` negates the drop and the score
    statistic (``T_{c,b}(-d) = -T_{b,c}(d)``), so the lower bound is the mirrored upper bound."""
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=True)
    return -_upper(c, b, n, z_value(confidence))


def drop_interval(b: int, c: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Tango score interval for the drop at ``confidence`` (each tail ``(1 - confidence) / 2``)."""
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=False)
    z = z_value(0.5 + confidence / 2.0)
    return -_upper(c, b, n, z), _upper(b, c, n, z)


def noninferiority_pvalue(b: int, c: int, n: int, margin: float) -> float:
    """One-sided p-value of ``H0: p_new - p_old <= -margin`` (the drop is at least ``margin``), Tango's score test.

    Small values are evidence that the drop is below the margin. Consistent with :func:`drop_upper_bound`:
    ``drop_upper_bound(b, c, n, 1 - alpha) < margin`` exactly when this p-value is ``< alpha`` (both read the same
    monotone statistic). With ``n == 0`` there is no evidence: p = 1.
    """
    b, c, n = _check_table(b, c, n)
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must lie in [0, 1], got {margin!r}")
    if n == 0:
        return 1.0
    if margin >= 1.0:
        return 0.0 if b < n else 1.0
    return float(_norm.cdf(score_statistic(b, c, n, margin)))


def wald_drop_upper_bound(b: int, c: int, n: int, confidence: float) -> float:
    """The textbook Wald bound ``d_hat + z sqrt((p_b + p_c - d_hat^2) / n)``, kept only to show (tests, docs) why it
    is not used: with few flips its plug-in variance is too small, and with none it is zero."""
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=True)
    if n == 0:
        return 1.0
    d = (b - c) / n
    var = max((b + c) / n - d * d, 0.0) / n
    return min(1.0, d + z_value(confidence) * math.sqrt(var))
