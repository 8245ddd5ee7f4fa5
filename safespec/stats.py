"""Paired-proportion statistics for the held-out certificate (numpy and scipy only, no torch).

The old and the new model are scored on the *same* held-out images, so each image falls in one cell of a
paired 2x2 table. Only the two discordant cells carry information about the change of accuracy:

    b = old right & new wrong   (negative flips)
    c = old wrong & new right   (positive flips)

and the accuracy drop is ``d = p_old - p_new = p_b - p_c``, estimated by ``(b - c) / n``.

Why Tango's score test and not something simpler (see docs/statistics.md for the full argument):

* The Wald bound ``d_hat + z * se_hat`` plugs the *observed* discordant rates into the variance. At the counts a
  certificate meets (a handful of flips in a few hundred images) that variance is too small and the bound too
  lenient; for a table with no flips at all it is exactly 0, so Wald would "certify" a one-image class.
* Tango's (1998) score test evaluates the variance under the null hypothesis itself (the restricted maximum
  likelihood estimate of the discordant rates given ``d = delta``, which has a closed form). Inverting it gives a
  bound that stays honest at small counts, is never degenerate, and matches exact unconditional tests closely.
* Exact unconditional tests (maximising the tail over the nuisance parameter) are slower by orders of magnitude
  and agree with Tango on the tables this tool sees; :func:`certification_probability` computes the exact
  probability that Tango's test certifies, which is how the tests check its size.

Every function is a pure function of counts, so a certificate can be recomputed from result.json alone.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import optimize
from scipy.stats import beta as _beta
from scipy.stats import binom as _binom
from scipy.stats import norm as _norm

__all__ = [
    "z_value",
    "restricted_mle",
    "score_statistic",
    "drop_upper_bound",
    "drop_lower_bound",
    "drop_interval",
    "noninferiority_pvalue",
    "wald_drop_upper_bound",
    "clopper_pearson",
    "clopper_pearson_interval",
    "needed_n",
    "min_informative_n",
    "is_inconclusive",
    "certification_probability",
]

# Root-finding tolerance on the drop scale. Bounds are reported to 4 decimals; 1e-12 keeps the bound/p-value
# equivalence exact except for tables constructed to sit on the margin to 12 digits.
_XTOL = 1e-12
# The open end of the parameter space: at delta = +-1 the null variance vanishes and the statistic is infinite.
_EDGE = 1e-12


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


def z_value(confidence: float) -> float:
    """Standard normal quantile of a one-sided ``confidence`` (1.6449 for 0.95)."""
    return float(_norm.ppf(confidence))


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


def _upper(b: int, c: int, n: int, z: float) -> float:
    """Largest drop ``delta`` that the one-sided score test at critical value ``z`` does not reject."""
    if n == 0:
        return 1.0  # nothing observed: the vacuous bound
    if b == n:
        return 1.0
    lo = (b - c) / n  # the statistic is 0 here, >= -z
    hi = 1.0 - _EDGE
    f = lambda d: score_statistic(b, c, n, d) + z  # noqa: E731  (decreasing in d)
    if f(hi) >= 0:
        return 1.0
    if f(lo) <= 0:  # z == 0 only
        return lo
    return float(optimize.brentq(f, lo, hi, xtol=_XTOL, rtol=4 * np.finfo(float).eps, maxiter=500))


def drop_upper_bound(b: int, c: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for the true accuracy drop ``p_old - p_new`` (Tango score interval).

    A capability is certified at margin ``eps`` exactly when this bound is <= ``eps``. Returns 1.0 (vacuous)
    when ``n == 0`` or every image flipped from right to wrong.
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


# -------------------------------------------------------------------------------- sample size, adequacy
def needed_n(b_rate: float, c_rate: float, margin: float, confidence: float, power: float = 0.8) -> int | None:
    """Held-out images needed for Tango's test to certify ``drop < margin`` with probability ``power`` when the
    true flip rates are ``b_rate`` (negative) and ``c_rate`` (positive), usually the observed ones.

    Closed-form asymptotic sample size of the paired non-inferiority score test (Nam 1997, Biometrics 53):
    ``n = ((z_conf sqrt(w0) + z_power sqrt(w1)) / (margin - d))^2`` with ``d = b_rate - c_rate``, the null
    variance ``w0 = 2 p~_c + margin (1 - margin)`` (``p~_c`` the restricted MLE at the margin, from the rates) and
    the true variance ``w1 = b_rate + c_rate - d^2``. Returns ``None`` when ``d >= margin``: a model that is truly
    that much worse can never be certified, however many images are collected.
    """
    _check_confidence(confidence, one_sided=True)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power!r}")
    if b_rate < 0 or c_rate < 0 or b_rate + c_rate > 1.0 + 1e-12:
        raise ValueError(f"flip rates must be non-negative and sum to at most 1, got {b_rate!r}, {c_rate!r}")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must lie in [0, 1], got {margin!r}")
    d = b_rate - c_rate
    if d >= margin:
        return None
    if margin >= 1.0:
        return 1
    p0 = float(restricted_mle(b_rate, c_rate, 1.0, margin))
    w0 = 2.0 * p0 + margin * (1.0 - margin)
    w1 = max(b_rate + c_rate - d * d, 0.0)
    n = ((z_value(confidence) * math.sqrt(w0) + float(_norm.ppf(power)) * math.sqrt(w1)) / (margin - d)) ** 2
    return max(1, math.ceil(n - 1e-9))


def min_informative_n(tolerance: float, confidence: float) -> int:
    """Smallest held-out size at which the certificate can mean something for this tolerance and confidence.

    For ``tolerance > 0``: the smallest n at which a table with no flips at all (the new model changed nothing)
    is certified; its bound is ``z^2 / (n + z^2)``, so ``n >= z^2 (1 - tol) / tol``. Below it a capability that is
    not certified is *inconclusive*: the data could not have certified an unchanged model, so "not certified"
    says nothing about the model. At ``tolerance == 0`` no unchanged model is ever certified (only a significant
    improvement is), so the threshold is the smallest n at which any table can certify (all images improved).
    """
    _check_confidence(confidence, one_sided=True)
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must lie in [0, 1], got {tolerance!r}")
    z = z_value(confidence)
    if tolerance > 0.0:
        n = max(1, math.ceil(z * z * (1.0 - tolerance) / tolerance - 1e-9))
        certifies = lambda m: _upper(0, 0, m, z) <= tolerance  # noqa: E731
    else:
        # b = 0, c = n: the score statistic at 0 is -sqrt(n); certified when it is <= -z.
        n = max(1, math.ceil(z * z - 1e-9))
        certifies = lambda m: _upper(0, m, m, z) <= 0.0  # noqa: E731
    # The closed form can be off by one through rounding; settle it with the very function that certifies.
    while n > 1 and certifies(n - 1):
        n -= 1
    while not certifies(n):
        n += 1
    return n


def is_inconclusive(n: int, tolerance: float, confidence: float) -> bool:
    """True when ``n`` is below :func:`min_informative_n` (or zero)."""
    return n <= 0 or n < min_informative_n(tolerance, confidence)


# ---------------------------------------------------------------------------------- exact operating curve
def certification_probability(p_b: float, p_c: float, n: int, margin: float, confidence: float) -> float:
    """Exact probability that Tango's test certifies ``drop < margin`` when n images are drawn with true
    negative/positive flip rates ``p_b`` and ``p_c`` (trinomial enumeration over every possible table).

    With ``p_b - p_c >= margin`` this is the test's actual type I error (it should not exceed ``1 - confidence``);
    below the margin it is the power, which checks :func:`needed_n`. It is how the docs and tests judge the
    score approximation without Monte Carlo error. Only tables with non-negligible probability are enumerated
    (the omitted mass is below 1e-12), so it is fast even for thousands of images.
    """
    _check_confidence(confidence, one_sided=True)
    if p_b < 0 or p_c < 0 or p_b + p_c > 1.0 + 1e-12:
        raise ValueError(f"flip rates must be non-negative and sum to at most 1, got {p_b!r}, {p_c!r}")
    n = int(n)
    if n <= 0:
        return 0.0
    z = z_value(confidence)
    # Enumerate only tables with non-negligible probability: the omitted mass is below 1e-12.
    b_lo, b_hi = (int(v) for v in _binom.ppf([1e-13, 1.0 - 1e-13], n, p_b))
    bs = np.arange(max(0, b_lo - 1), min(n, b_hi + 1) + 1)
    q = 0.0 if p_b >= 1.0 else min(1.0, p_c / (1.0 - p_b))
    # c | b ~ Bin(n - b, q): the smallest n - b bounds the lower tail, the largest the upper one.
    c_lo = int(_binom.ppf(1e-13, n - bs[-1], q))
    c_hi = int(_binom.ppf(1.0 - 1e-13, n - bs[0], q))
    cs = np.arange(max(0, c_lo - 1), min(n, c_hi + 1) + 1)
    B, Cc = np.meshgrid(bs, cs, indexing="ij")
    feasible = B + Cc <= n
    cond = np.where(feasible, _binom.pmf(Cc, np.maximum(n - B, 0), q), 0.0)
    t = score_statistic(B, Cc, n, margin)
    reject = feasible & (t <= -z)
    return float(np.sum(_binom.pmf(bs, n, p_b)[:, None] * cond * reject))
