"""Operating characteristics of the certificate: the chance a capability certifies at given flip rates, the
sample size needed, and the smallest size at which certifying is possible at all."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import bdtr
from scipy.stats import binom as _binom
from scipy.stats import norm as _norm

from . import exact
from .base import DEFAULT_TEST, Test, _check_confidence, _check_margin, _check_test, z_value
from .exact import (
    _exact_certifies,
    _exact_column,
    _exact_column_p,
    exact_gamma,
)
from .score import _upper, restricted_mle, score_statistic


# -------------------------------------------------------------------------------- sample size, adequacy
def _nam_n(b_rate: float, c_rate: float, margin: float, confidence: float, power: float) -> int:
    """Nam's (1997) closed-form asymptotic sample size of the score test (``d < margin < 1``)."""
    d = b_rate - c_rate
    p0 = float(restricted_mle(b_rate, c_rate, 1.0, margin))
    w0 = 2.0 * p0 + margin * (1.0 - margin)
    w1 = max(b_rate + c_rate - d * d, 0.0)
    n = ((z_value(confidence) * math.sqrt(w0) + float(_norm.ppf(power)) * math.sqrt(w1)) / (margin - d)) ** 2
    return max(1, math.ceil(n - 1e-9))


# The exact needed_n decides "power >= target" at most this many times.
_NEEDED_N_EVALS = 40
#: Above this many images (by Nam's formula) ``needed_n`` reports the asymptotic size for the exact test too.
EXACT_NEEDED_N_MAX = 2000
# Steering steps of the exact needed_n: first through Tango's exact power (cheap, close at large n), then through
# estimates of the exact test's own.
_STEER_SCORE = 3
_STEER_EXACT = 2


def needed_n(
    b_rate: float, c_rate: float, margin: float, confidence: float, power: float = 0.8, test: Test = DEFAULT_TEST
) -> int | None:
    """Held-out images needed for ``test`` to certify ``drop < margin`` with probability ``power`` when the true
    flip rates are ``b_rate`` (negative) and ``c_rate`` (positive), usually the observed ones.

    Both start from the closed-form asymptotic sample size of the paired non-inferiority score test (Nam 1997,
    Biometrics 53): ``n = ((z_conf sqrt(w0) + z_power sqrt(w1)) / (margin - d))^2`` with ``d = b_rate - c_rate``,
    the null variance ``w0 = 2 p~_c + margin (1 - margin)`` (``p~_c`` the restricted MLE at the margin, from the
    rates) and the true variance ``w1 = b_rate + c_rate - d^2``. That is the answer for ``"score"``.

    For ``"exact"`` the formula is only the start. Steering: asymptotically the probit of the power is linear in
    ``sqrt(n)`` with a known slope; up to three steps along it through Tango's exact power (cheap, and close to the
    exact test's at large n), then up to two through estimates of the exact test's power (accurate to about 1e-3),
    move to where the power should reach ``power``. Settling: from there, sizes gallop outward and
    are bisected until a size ``m`` whose exact certification probability (:func:`certification_probability`,
    decided in looks of growing precision that stop once the answer is certain) is ``>= power`` sits next to
    ``m - 1``, whose probability is not. Power is not monotone in n (discreteness: with no positive flips it jumps
    by several points between neighbouring sizes), so other crossings may lie a few images away and a smaller size
    can occasionally reach the power too; the answer is a crossing next to the steered size. At most 40
    decisions; each costs a few exact p-values per positive-flip count within the 1e-3 (then 1e-6) quantiles, so
    the work grows with ``sqrt(n c_rate)``. An unchanged model (both rates 0) needs exactly :func:`min_informative_n`.

    Returns ``None`` when ``d >= margin``: a model that is truly that much worse can never be certified, however
    many images are collected.
    """
    _check_confidence(confidence, one_sided=True)
    _check_test(test)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power!r}")
    if b_rate < 0 or c_rate < 0 or b_rate + c_rate > 1.0 + 1e-12:
        raise ValueError(f"flip rates must be non-negative and sum to at most 1, got {b_rate!r}, {c_rate!r}")
    margin = _check_margin(margin)
    if b_rate - c_rate >= margin:
        return None
    if margin >= 1.0:
        return 1
    n0 = _nam_n(b_rate, c_rate, margin, confidence, power)
    if test == "score":
        return n0
    if b_rate == 0.0 and c_rate == 0.0:
        return min_informative_n(margin, confidence, test)
    if n0 > EXACT_NEEDED_N_MAX:
        # the exact search's work grows with n (a table at 13,857 images took 99 s on 2 cores, inside a
        # certificate); this large, the two tests' sizes agree within a few tenths of a point (the size
        # table in bench/RESULTS.md), and the answer means "thousands of images" either way
        return n0
    return _exact_needed_n(float(b_rate), float(c_rate), margin, float(confidence), float(power), n0)


def _exact_power_at_least(b_rate: float, c_rate: float, m: int, margin: float, confidence: float, power: float) -> bool:
    """``certification_probability(b_rate, c_rate, m, ..., "exact") >= power``, in looks of growing cost that stop
    as soon as the answer is certain: columns within the 1e-3, then 1e-6 quantiles of ``C``, the rest counted both
    ways (low and high); first the p-value's region (it contains the certificate's, so its high bounds the power
    from above), then the certificate's; last the full enumeration."""
    if m <= 0:
        return False
    for mass in (1e-3, 1e-6):
        if _exact_power(b_rate, c_rate, m, margin, confidence, mass, False)[1] < power:
            return False
        low, high = _exact_power(b_rate, c_rate, m, margin, confidence, mass, True)
        if low >= power or high < power:
            return low >= power
    return certification_probability(b_rate, c_rate, m, margin, confidence, "exact") >= power


@lru_cache(maxsize=4096)
def _exact_needed_n(b_rate: float, c_rate: float, margin: float, confidence: float, power: float, n0: int) -> int:
    """See :func:`needed_n`: steer from Nam's n0 with estimates, then settle adjacent sizes with decisions."""
    d = b_rate - c_rate
    target = float(_norm.ppf(power))
    # Asymptotically probit(power) is linear in sqrt(n) with slope (margin - d) / sqrt(w1) (Nam's formula): steer
    # along that slope, first through Tango's exact power (cheap), then through estimates of the exact test's
    # (the p-value's region, columns within the 1e-3 quantiles). (Secant slopes from the powers themselves are
    # thrown off by the sawtooth.)
    slope = (margin - d) / math.sqrt(max(b_rate + c_rate - d * d, 1e-300))

    def probit(m: int, test: str) -> float:
        if test == "score":
            pw = certification_probability(b_rate, c_rate, m, margin, confidence, "score")
        else:
            pw = sum(_exact_power(b_rate, c_rate, m, margin, confidence, 1e-3, False)) / 2.0
        return float(_norm.ppf(min(max(pw, 1e-9), 1.0 - 1e-9)))

    m = n0
    for test, steps in (("score", _STEER_SCORE), ("exact", _STEER_EXACT)):
        for _ in range(steps):
            x = math.sqrt(m) + (target - probit(m, test)) / slope
            m_new = max(1, round(x * x))
            if abs(m_new - m) <= 1:
                break
            m = m_new
    # Settle: a size that certifies with enough power next to one that does not, galloping out from the steered one.
    evals = 0

    def enough(k: int) -> bool:
        nonlocal evals
        evals += 1
        return _exact_power_at_least(b_rate, c_rate, k, margin, confidence, power)

    step = 1
    if enough(m):
        hi = m
        while True:
            lo = max(0, hi - step)
            if lo == 0 or not enough(lo):
                break
            hi, step = lo, 2 * step
    else:
        lo = m
        while True:
            hi = lo + step
            if enough(hi):
                break
            if evals >= _NEEDED_N_EVALS:
                return hi  # not settled within the budget: the largest size tried, which falls short
            lo, step = hi, 2 * step
    while hi - lo > 1 and evals < _NEEDED_N_EVALS:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


def min_informative_n(tolerance: float, confidence: float, test: Test = DEFAULT_TEST) -> int:
    """Smallest held-out size at which the certificate can mean something for this tolerance and confidence.

    For ``tolerance > 0``: the smallest n at which ``test`` certifies a table with no flips at all (the new model
    changed nothing). Tango's bound for it is ``z^2 / (n + z^2)``, so ``n >= z^2 (1 - tol) / tol``; the exact test's
    p-value is at least ``(1 - tol)^n + gamma`` (the null point ``p_c = 0``), so ``n >= log(alpha - gamma) /
    log(1 - tol)``. Below it a capability that is not certified is *inconclusive*: the data could not have certified
    an unchanged model, so "not certified" says nothing about the model. At ``tolerance == 0`` no unchanged model
    is ever certified (only a significant improvement is), so the threshold is the smallest n at which any table
    can certify (all images improved). The closed forms are starting points; the answer is settled by
    :func:`certifies` itself.
    """
    _check_confidence(confidence, one_sided=True)
    _check_test(test)
    if isinstance(tolerance, (bool, np.bool_)) or not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must lie in [0, 1], got {tolerance!r}")
    return _min_informative_n(float(tolerance), float(confidence), test)


@lru_cache(maxsize=1024)
def _min_informative_n(tolerance: float, confidence: float, test: str) -> int:
    z = z_value(confidence)
    alpha = 1.0 - confidence
    if tolerance > 0.0:
        if test == "score":
            n = math.ceil(z * z * (1.0 - tolerance) / tolerance - 1e-9)
            certifies_ = lambda m: _upper(0, 0, m, z) <= tolerance  # noqa: E731
        else:
            floor = alpha - exact_gamma(alpha)
            n = 1 if tolerance >= 1.0 else math.ceil(math.log(floor) / math.log1p(-tolerance) - 1e-9)
            certifies_ = lambda m: _exact_certifies(0, 0, m, tolerance, confidence)  # noqa: E731
    else:
        # b = 0, c = n: the score statistic at 0 is -sqrt(n); certified when it is <= -z.
        n = math.ceil(z * z - 1e-9)
        if test == "score":
            certifies_ = lambda m: _upper(0, m, m, z) <= 0.0  # noqa: E731
        else:
            certifies_ = lambda m: _exact_certifies(0, m, m, 0.0, confidence)  # noqa: E731
    n = max(1, n)
    # The closed form can be off (rounding; for the exact test, the supremum over p_c); settle it with the very
    # function that certifies, galloping so that a far start costs only a few evaluations.
    if certifies_(n):
        hi, step = n, 1
        while hi > 1:
            lo = max(1, hi - step)
            if not certifies_(lo):
                break
            hi, step = lo, 2 * step
        else:
            return 1
    else:
        lo, step = n, 1
        while True:
            hi = lo + step
            if certifies_(hi):
                break
            lo, step = hi, 2 * step
    while hi - lo > 1:  # not certified at lo, certified at hi
        mid = (lo + hi) // 2
        if certifies_(mid):
            hi = mid
        else:
            lo = mid
    return hi


def flip_allowance(n: int, tolerance: float, confidence: float, test: Test = DEFAULT_TEST) -> int:
    """The most negative flips a capability of ``n`` held-out images can show, with none gained, and still be
    certified (-1: not even an unchanged model is). What a spec's held-out split lets a release lose, before
    anything is trained: at 200 images, a 3-point tolerance and 95%, one image per capability."""
    _check_confidence(confidence, one_sided=True)
    _check_test(test)
    if isinstance(tolerance, (bool, np.bool_)) or not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must lie in [0, 1], got {tolerance!r}")
    if isinstance(n, (bool, np.bool_)) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return _flip_allowance(int(n), float(tolerance), float(confidence), test)


@lru_cache(maxsize=1024)
def _flip_allowance(n: int, tolerance: float, confidence: float, test: str) -> int:
    if test == "score":
        z = z_value(confidence)
        ok = lambda b: _upper(b, 0, n, z) <= tolerance  # noqa: E731
    else:
        ok = lambda b: _exact_certifies(b, 0, n, tolerance, confidence)  # noqa: E731
    if n == 0:
        return -1
    return exact._last_true(ok, 0, n)  # the tables that certify are a lower set in b


def is_inconclusive(n: int, tolerance: float, confidence: float, test: Test = DEFAULT_TEST) -> bool:
    """True when ``n`` is below :func:`min_informative_n` for ``test`` (or zero)."""
    return n <= 0 or n < min_informative_n(tolerance, confidence, test)


def clear_caches() -> None:
    """Forget every cached p-value, bound walk, score grid, rejection region and sample size (for timing a
    cold start; results never depend on what was cached)."""
    exact.clear_caches()
    for f in (_exact_needed_n, _min_informative_n, _flip_allowance):
        f.cache_clear()


# ---------------------------------------------------------------------------------- exact operating curve
def _exact_power(
    p_b: float, p_c: float, n: int, margin: float, confidence: float, mass: float, fail_closed: bool
) -> tuple[float, float]:
    """``(low, high)`` around the probability that the exact test certifies, from the columns ``c`` inside the
    ``Bin(n, p_c)`` quantiles ``mass / 2`` and ``1 - mass / 2``; ``high - low`` is the probability of the columns left
    out. ``fail_closed=False`` uses the p-value's region alone, which contains the certificate's, so its ``high``
    is an upper bound for the certificate too (a cheap first look for :func:`needed_n`)."""
    column = _exact_column if fail_closed else _exact_column_p
    c_lo, c_hi = (int(v) for v in _binom.ppf([mass / 2.0, 1.0 - mass / 2.0], n, p_c))
    cs = np.arange(max(0, c_lo - 1), min(n, c_hi + 1) + 1)
    bmax = np.array([column(n, margin, confidence, int(c)) for c in cs])
    q = 0.0 if p_c >= 1.0 else min(1.0, p_b / (1.0 - p_c))
    m = n - cs
    k = np.minimum(bmax, m)
    cdf = np.where(k < 0, 0.0, bdtr(np.maximum(k, 0), m, q))
    pmf = _binom.pmf(cs, n, p_c)
    low = float(min(1.0, np.sum(pmf * cdf)))
    rest = float(_binom.cdf(cs[0] - 1, n, p_c) + _binom.sf(cs[-1], n, p_c))
    return low, min(1.0, low + rest)


def certification_probability(
    p_b: float, p_c: float, n: int, margin: float, confidence: float, test: Test = DEFAULT_TEST
) -> float:
    """Exact probability that ``test`` certifies ``drop < margin`` when n images are drawn with true
    negative/positive flip rates ``p_b`` and ``p_c`` (trinomial enumeration over every possible table).

    With ``p_b - p_c >= margin`` this is the test's actual type I error (it should not exceed ``1 - confidence``);
    below the margin it is the power, which checks :func:`needed_n`. It is how the docs and tests judge the tests
    without Monte Carlo error. Only tables with non-negligible probability are enumerated (the omitted mass is
    below 1e-12), so it is fast even for thousands of images.

    ``"score"``: every table's Tango statistic at the margin against ``-z``. ``"exact"``: the rejection region
    ``b <= b_max(c)`` of :func:`exact_region` (cached per ``(n, margin, confidence, c)``), the certificate's own
    decision; ``B`` given ``C = c`` is ``Bin(n - c, p_b / (1 - p_c))``, summed exactly by its CDF.
    """
    _check_confidence(confidence, one_sided=True)
    _check_test(test)
    margin = _check_margin(margin)
    if p_b < 0 or p_c < 0 or p_b + p_c > 1.0 + 1e-12:
        raise ValueError(f"flip rates must be non-negative and sum to at most 1, got {p_b!r}, {p_c!r}")
    n = int(n)
    if n <= 0:
        return 0.0
    if test == "exact":
        return _exact_power(float(p_b), float(p_c), n, margin, float(confidence), 1e-13, True)[0]
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
