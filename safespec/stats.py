"""Paired-proportion statistics for the held-out certificate (numpy and scipy only, no torch).

The old and the new model are scored on the *same* held-out images, so each image falls in one cell of a
paired 2x2 table. Only the two discordant cells carry information about the change of accuracy:

    b = old right & new wrong   (negative flips)
    c = old wrong & new right   (positive flips)

and the accuracy drop is ``d = p_old - p_new = p_b - p_c``, estimated by ``(b - c) / n``.

Two tests are implemented, and a certificate names the one it used (``test="exact"`` is the default):

* ``"score"``: Tango's (1998) asymptotic score test. The Wald bound ``d_hat + z * se_hat`` plugs the *observed*
  discordant rates into the variance, which at a handful of flips is far too small (zero for a table without
  flips); Tango's statistic evaluates the variance under the null hypothesis itself (the restricted maximum
  likelihood estimate of the discordant rates given ``d = delta``, in closed form). Its actual false-certification
  rate still exceeds the nominal level near the margin (5.9% at nominal 5%, n = 200, tolerance 0.03, p_c = 0).
* ``"exact"``: an exact unconditional test ordered by Tango's statistic, with the nuisance parameter (the
  positive-flip rate) handled as Berger & Boos (1994) do: the tail probability is maximised over a
  ``1 - gamma`` Clopper-Pearson interval for ``p_c`` and ``gamma`` is added to the p-value. Its size is at most
  the nominal level (a proof, up to the numerical maximisation; see :func:`exact_pvalue`), at the cost of a little
  power.

:func:`certification_probability` computes the exact probability that either test certifies (trinomial
enumeration), which is how the tests and the bench measure their size and power.

Every function is a pure function of counts, so a certificate can be recomputed from result.json alone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize
from scipy.special import bdtr, bdtrc, gammaln, xlog1py, xlogy
from scipy.stats import beta as _beta
from scipy.stats import binom as _binom
from scipy.stats import norm as _norm

__all__ = [
    "DEFAULT_TEST",
    "EXACT_GAMMA",
    "TESTS",
    "certification_probability",
    "certifies",
    "clear_caches",
    "clopper_pearson",
    "clopper_pearson_interval",
    "drop_interval",
    "drop_lower_bound",
    "drop_upper_bound",
    "exact_drop_upper_bound",
    "exact_gamma",
    "exact_pvalue",
    "exact_region",
    "is_inconclusive",
    "min_informative_n",
    "needed_n",
    "noninferiority_pvalue",
    "restricted_mle",
    "score_statistic",
    "upper_bound",
    "wald_drop_upper_bound",
    "z_value",
]

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


# ------------------------------------------------------------------------------ exact unconditional test
# How far the enumeration of the nuisance direction reaches: positive-flip counts c' with P(C > c') <= _TAIL under
# the largest p_c considered are left out, and that probability is added to the tail (so leaving them out is
# conservative). Tables are otherwise enumerated in full.
_TAIL = 1e-13
# Maximisation over p_c (_sup_tail): a grid over the nuisance interval with _GRID_PER_UNIT points per 1/n (the tail
# wiggles on that scale, one wiggle per column) and at least _GRID_MIN; _LEVELS nested grids of _SUBGRID points
# around its _REFINE best local maxima and _REFINE best points (after the first, only the _KEEP best of them go on);
# then a bounded scalar maximisation at the best one.
_GRID_MIN = 16
_GRID_PER_UNIT = 1.0
_GRID_MAX = 4000
_REFINE = 3
_SUBGRID = 9
_LEVELS = 3
_XATOL = 1e-2
_KEEP = 3
# Width of the final bisection bracket of the exact bound (the bound reported is the bracket's upper end): 2^-24.
_BOUND_XTOL = 2.0 ** -24
# Ties: tables whose statistic is within this (relative) distance of the observed one count as at least as extreme.
_TIE = 1e-10


def exact_gamma(alpha: float) -> float:
    """The Berger-Boos ``gamma`` the exact test uses at level ``alpha``: :data:`EXACT_GAMMA` (0.001), or
    ``alpha / 10`` when that is smaller, so that a certificate at confidence 0.999 or above is still possible."""
    return min(EXACT_GAMMA, float(alpha) / 10.0)


@lru_cache(maxsize=1 << 14)
def _nuisance_interval(c: int, n: int, delta: float, gamma: float) -> tuple[float, float]:
    """The two-sided ``1 - gamma`` Clopper-Pearson interval of ``p_c`` (``c ~ Bin(n, p_c)`` marginally), cut to the
    rates the null boundary allows: ``p_c >= max(0, -delta)`` and ``p_b = p_c + delta <= 1 - p_c``."""
    g = gamma / 2.0
    lo = 0.0 if c == 0 else float(_beta.ppf(g, c, n - c + 1))
    hi = 1.0 if c == n else float(_beta.ppf(1.0 - g, c + 1, n - c))
    return max(lo, max(0.0, -delta)), min(hi, (1.0 - delta) / 2.0)


@lru_cache(maxsize=1 << 14)
def _reach(n: int, p: float) -> int:
    """The smallest k with ``P(Bin(n, p) > k) <= _TAIL`` (plus one, for rounding), at most n."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    return min(n, int(_binom.isf(_TAIL, n, p)) + 1)


def _extent(k: int, n: int) -> int:
    """Round a grid extent up (to a multiple of 64, at most n) so that one cached score grid serves many tables."""
    return min(n, (k // 64 + 1) * 64)


# Score grids are kept, most recently used first, up to this many cells in all (8M cells, 64 MB): a grid at a
# positive-flip rate near one half can hold millions of cells, so the cache is bounded by size, not by count.
_GRID_CACHE_CELLS = 1 << 23
_grid_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
_grid_cells = 0


def _score_grid(n: int, delta: float, b_ext: int, c_ext: int) -> np.ndarray:
    """Tango's statistic at ``delta`` for every table ``(b', c')`` with ``b' <= b_ext``, ``c' <= c_ext``, indexed
    ``[b', c']``; ``+inf`` where ``b' + c' > n``. Read-only and cached: callers slice it, and a slice of a larger grid
    holds the very same numbers (elementwise arithmetic), so results never depend on what was cached before."""
    global _grid_cells
    key = (n, delta, b_ext, c_ext)
    t = _grid_cache.get(key)
    if t is not None:
        _grid_cache.move_to_end(key)
        return t
    B, C = np.meshgrid(np.arange(b_ext + 1), np.arange(c_ext + 1), indexing="ij")
    t = np.where(n >= B + C, score_statistic(B, C, n, delta), np.inf)
    t.setflags(write=False)
    _grid_cache[key] = t
    _grid_cells += t.size
    while _grid_cells > _GRID_CACHE_CELLS and len(_grid_cache) > 1:
        _grid_cells -= _grid_cache.popitem(last=False)[1].size
    return t


@lru_cache(maxsize=1 << 12)
def _columns(n: int, c_hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``c' = 0 .. c_hi``, ``n - c'`` and ``log C(n, c')``."""
    cs = np.arange(c_hi + 1)
    return cs, n - cs, gammaln(n + 1.0) - gammaln(cs + 1.0) - gammaln(n - cs + 1.0)


def _tail(p, n: int, delta: float, bmax: np.ndarray, c_hi: int) -> np.ndarray:
    """``P(table in the region)`` on the null boundary ``p_b = p_c + delta`` for each ``p_c`` in ``p``, where the
    region is ``{(b', c'): b' <= bmax[c'], c' <= c_hi}`` plus every table with ``c' > c_hi`` (added as
    ``P(C > c_hi)``, so the truncation only ever enlarges the tail). ``C ~ Bin(n, p_c)`` and, given ``C = c'``,
    ``B ~ Bin(n - c', (p_c + delta) / (1 - p_c))``: the b-direction is summed exactly by the binomial CDF."""
    p = np.asarray(p, dtype=float).reshape(-1, 1)
    cs, m, log_choose = _columns(n, c_hi)
    pmf = np.exp(log_choose + xlogy(cs, p) + xlog1py(m, -p))
    q = np.clip((p + delta) / (1.0 - p), 0.0, 1.0)
    k = np.minimum(bmax, m)
    cdf = np.where(k < 0, 0.0, bdtr(np.maximum(k, 0), m, q))
    return np.sum(pmf * cdf, axis=1) + bdtrc(c_hi, n, p[:, 0])


def _sup_tail(n: int, delta: float, bmax: np.ndarray, c_hi: int, lo: float, hi: float,
              stop: tuple[float, float] | None = None) -> float:
    """``sup`` of :func:`_tail` over ``p_c`` in ``[lo, hi]``, looking closer in steps: a grid over the interval, one
    point per ``1/n`` (the tail wiggles on about that scale, one wiggle per column ``c'``) and at least 16; around
    the ``_REFINE`` best local maxima and the ``_REFINE`` best points of the grid, ``_LEVELS`` nested grids of
    ``_SUBGRID`` points, each between the neighbours of the last one's best point (one vectorised evaluation per
    level; after the first level only the ``_KEEP`` best candidates go on); last, a bounded scalar maximisation
    (scipy's bounded Brent) between the neighbours of the best point so far. The largest value seen is returned.

    With ``stop = (gamma, alpha)`` it returns as soon as the largest value seen has ``value + gamma > alpha``: the
    supremum is at least that, so the test does not reject whatever the later steps would find."""
    if hi <= lo:
        return float(_tail([lo], n, delta, bmax, c_hi)[0])
    done = (lambda x: x + stop[0] > stop[1]) if stop is not None else (lambda x: False)
    g = min(_GRID_MAX, max(_GRID_MIN, math.ceil(_GRID_PER_UNIT * n * (hi - lo)) + 1))
    ps = np.linspace(lo, hi, g)
    v = _tail(ps, n, delta, bmax, c_hi)
    best = float(v.max())
    if done(best):
        return best
    up = np.concatenate(([True], v[1:] >= v[:-1]))
    down = np.concatenate((v[:-1] >= v[1:], [True]))
    peaks = np.flatnonzero(up & down)
    # the best local maxima, and the best points outright (a shallow maximum between two grid points can leave
    # both of them below a grid maximum at an end of the interval)
    peaks = np.union1d(peaks[np.argsort(-v[peaks], kind="stable")[:_REFINE]], np.argsort(-v, kind="stable")[:_REFINE])
    a, b = ps[np.maximum(peaks - 1, 0)], ps[np.minimum(peaks + 1, g - 1)]
    for level in range(_LEVELS):
        sub = np.linspace(a, b, _SUBGRID, axis=1)  # one row per candidate
        vv = _tail(sub.ravel(), n, delta, bmax, c_hi).reshape(sub.shape)
        best = max(best, float(vv.max()))
        if done(best):
            return best
        k = vv.argmax(axis=1)
        rows = np.arange(len(k))
        a, b = sub[rows, np.maximum(k - 1, 0)], sub[rows, np.minimum(k + 1, _SUBGRID - 1)]
        if level == 0 and _KEEP:
            keep = np.argsort(-vv.max(axis=1), kind="stable")[:_KEEP]
            vv, a, b = vv[keep], a[keep], b[keep]
    j = int(vv.max(axis=1).argmax())
    if b[j] > a[j]:
        r = optimize.minimize_scalar(lambda x: -float(_tail([x], n, delta, bmax, c_hi)[0]), bounds=(a[j], b[j]),
                                     method="bounded", options={"xatol": _XATOL * (b[j] - a[j])})
        best = max(best, -float(r.fun))
    return best


def _exact_setup(b: int, c: int, n: int, delta: float, gamma: float):
    """What the exact p-value needs: the final p-value itself where it is immediate (a float), else the region
    ``bmax`` (largest ``b'`` at least as extreme, per column ``c' <= c_hi``), ``c_hi`` and the nuisance interval."""
    if delta <= -1.0:
        return 1.0  # every distribution is in the null
    if delta >= 1.0:
        return 1.0 if b == n else gamma  # the null is the single point p_b = 1, which never leaves an image unflipped
    # The ordering: Tango's statistic, formally its running maximum over b' <= b at fixed c (identical wherever
    # Tango's statistic is non-decreasing in b, which tests/test_stats.py checks on a grid). It makes "at least as
    # extreme" a lower set in b for every c, which the reduction to the null boundary needs.
    t = float(np.max(score_statistic(np.arange(b + 1), c, n, delta)))
    lo, hi = _nuisance_interval(c, n, delta, gamma)
    if lo > hi:
        return gamma  # the interval for p_c excludes every rate the null allows
    thr = t + _TIE * max(1.0, abs(t)) if math.isfinite(t) else t
    c_hi = _reach(n, hi)
    b_hi = _reach(n, min(1.0, (hi + delta) / (1.0 - hi)))
    grid = _score_grid(n, delta, _extent(b_hi, n), _extent(c_hi, n))[: b_hi + 1, : c_hi + 1]
    exceed = grid > thr
    # Largest b' of each column before the first table less extreme than the observed one; a column whose
    # enumerated part is all at least as extreme is counted in full (conservative by at most P(B > b_hi)).
    bmax = np.where(exceed.any(axis=0), exceed.argmax(axis=0) - 1, n - np.arange(c_hi + 1))
    return bmax, c_hi, lo, hi


@lru_cache(maxsize=1 << 16)
def _exact_p(b: int, c: int, n: int, delta: float, gamma: float) -> float:
    """The exact p-value (see :func:`exact_pvalue`); arguments already checked, ``n >= 1``."""
    setup = _exact_setup(b, c, n, delta, gamma)
    if isinstance(setup, float):
        return setup
    bmax, c_hi, lo, hi = setup
    return min(1.0, _sup_tail(n, delta, bmax, c_hi, lo, hi) + gamma)


@lru_cache(maxsize=1 << 17)
def _exact_rejects(b: int, c: int, n: int, delta: float, gamma: float, alpha: float) -> bool:
    """``_exact_p(b, c, n, delta, gamma) <= alpha``, the same computation stopped as soon as a value of the tail
    shows that it is not (so a table far from rejection costs only the grid)."""
    setup = _exact_setup(b, c, n, delta, gamma)
    if isinstance(setup, float):
        return setup <= alpha
    bmax, c_hi, lo, hi = setup
    return min(1.0, _sup_tail(n, delta, bmax, c_hi, lo, hi, stop=(gamma, alpha)) + gamma) <= alpha


def exact_pvalue(b: int, c: int, n: int, margin: float, gamma: float = EXACT_GAMMA) -> float:
    """Exact unconditional p-value of ``H0: drop = p_b - p_c >= margin``, ordered by Tango's score statistic, with the
    nuisance rate handled as Berger & Boos (1994) do:

        p = sup over p_c in CI_gamma(c) of P_{p_b = p_c + margin, p_c}( T(B, C) <= T(b, c) ) + gamma

    where ``CI_gamma(c)`` is the two-sided ``1 - gamma`` Clopper-Pearson interval for ``p_c`` (``c`` is marginally
    ``Bin(n, p_c)``), cut to the rates the null allows, and ``T`` is Tango's statistic at ``margin`` (formally its
    running maximum over ``b`` at fixed ``c``; the same numbers wherever Tango's statistic is non-decreasing in ``b``).

    What is proved: for any ``(p_b, p_c)`` in the null, ``P(p <= alpha) <= alpha``. (1) ``{T <= t}`` is a lower set
    in ``b`` for each ``c``; given ``C = c``, ``B ~ Bin(n - c, p_b / (1 - p_c))`` is stochastically increasing in
    ``p_b`` while ``C``'s law does not depend on ``p_b``, so at fixed ``p_c`` the tail is largest on the boundary
    ``p_b = p_c + margin``. (2) Berger & Boos: ``P(p <= alpha) <= P(p_c not in CI) + P(tail at the true p_c <=
    alpha - gamma) <= gamma + (alpha - gamma)``. (3) The tail is enumerated exactly in ``b`` (binomial CDF) and
    truncated in ``c`` only where ``P(C > c_hi) <= 1e-13``, and that mass is *added*; a column whose enumerated
    part is entirely in the region is counted in full. Both only enlarge the p-value.

    What is not proved: that the numerical supremum over ``p_c`` (a grid of one point per ``1/n``, nested finer
    grids around the best candidates, then scipy's bounded maximisation; see :func:`_sup_tail`) is the true
    supremum; the tail is a smooth but wiggly function of ``p_c``. On the 1,472 maximisations behind the tables
    ``b <= 30``, ``c <= 28``, n from 30 to 2000 and drops from -0.02 to 0.1, it came within 1e-11 of a reference
    (a grid 200 points per ``1/n``, refined to 1e-14), and tests/test_stats.py checks it against a brute-force
    enumeration and checks the resulting size exactly (:func:`certification_probability`) on a grid.

    Returns 1 when ``n == 0``. ``margin`` may be negative (down to -1): the bound's bisection needs it.
    """
    b, c, n = _check_table(b, c, n)
    margin = _check_margin(margin, -1.0)
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie in (0, 1), got {gamma!r}")
    if n == 0:
        return 1.0
    return _exact_p(b, c, n, margin, float(gamma))


def _bound_brackets(b: int, c: int, n: int, confidence: float):
    """The bisection behind :func:`exact_drop_upper_bound`, as the brackets ``(lo, hi)`` it passes through: after
    the first, the exact test does not reject at ``lo`` and rejects at ``hi``; ``lo`` only grows and ``hi`` only
    shrinks; the last ``hi`` is the bound. The sequence depends on the table and the confidence only (it starts
    from Tango's bound), so a caller that stops early, as soon as the bracket lies on one side of a margin, learns
    which side the bound is on without computing it."""
    if n == 0 or b == n:
        yield 1.0, 1.0
        return
    alpha = 1.0 - confidence
    gamma = exact_gamma(alpha)
    rejects = lambda d: _exact_rejects(b, c, n, d, gamma, alpha)  # noqa: E731
    top, bottom = 1.0 - _EDGE, -1.0 + _EDGE
    # Every probe lies on a dyadic lattice: the start is Tango's bound rounded down to a multiple of
    # 2^-ceil(log2(2n)) (about how far the exact bound sits from Tango's), steps are multiples of it and midpoints
    # halve it. Tables with bounds near one another then probe the same drops and share their score grids.
    step = 2.0 ** -math.ceil(math.log2(2 * n))
    start = min(max(math.floor(_upper(b, c, n, z_value(confidence)) / step) * step, bottom), top)
    if rejects(start):
        hi = start
        while True:
            d = max(bottom, hi - step)
            if not rejects(d):
                lo = d
                break
            if d == bottom:
                yield bottom, bottom
                return
            hi, step = d, 2.0 * step
    else:
        lo = start
        while True:
            d = min(top, lo + step)
            if rejects(d):
                hi = d
                break
            if d == top:
                yield 1.0, 1.0  # not rejected anywhere below 1: the vacuous bound
                return
            lo, step = d, 2.0 * step
    yield lo, hi
    while hi - lo > _BOUND_XTOL:
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            hi = mid
        else:
            lo = mid
        yield lo, hi


def _exact_bound(b: int, c: int, n: int, confidence: float) -> float:
    hi = 1.0
    for bracket in _bound_brackets(b, c, n, confidence):
        hi = bracket[1]  # the last bracket is the tightest
    return hi


def _exact_bound_at_most(b: int, c: int, n: int, confidence: float, margin: float) -> bool:
    """``exact_drop_upper_bound(b, c, n, confidence) <= margin``, stopping the bisection as soon as it is decided
    (the p-values are cached, so a bound computed before is replayed for free)."""
    hi = 1.0
    for lo, hi in _bound_brackets(b, c, n, confidence):
        if hi <= margin:
            return True
        if lo >= margin:
            return False
    return hi <= margin


def exact_drop_upper_bound(b: int, c: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound for the drop from the exact test: the smallest ``delta`` at which
    :func:`exact_pvalue` (with ``gamma = exact_gamma(1 - confidence)``) is ``<= 1 - confidence``, found by bisection
    from Tango's bound to a bracket of width 2^-24 (6e-8); the upper end of the final bracket is returned, a drop at
    which the test rejects. Returns 1.0 (vacuous) when ``n == 0`` or every image flipped from right to wrong.

    An exact unconditional p-value need not be monotone in ``delta``. Where it is, "bound <= margin" and "p-value at
    the margin <= alpha" are the same statement (up to the bracket's width); where it is not, the bisection finds
    one crossing, and :func:`certifies` fails closed: it asks for both.
    """
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=True)
    return _exact_bound(b, c, n, float(confidence))


def upper_bound(b: int, c: int, n: int, confidence: float, test: Test = DEFAULT_TEST) -> float:
    """The one-sided upper confidence bound for the drop that ``test`` reports: :func:`exact_drop_upper_bound` or
    Tango's :func:`drop_upper_bound`."""
    _check_test(test)
    if test == "score":
        return drop_upper_bound(b, c, n, confidence)
    return exact_drop_upper_bound(b, c, n, confidence)


def certifies(b: int, c: int, n: int, margin: float, confidence: float, test: Test = DEFAULT_TEST) -> bool:
    """The certificate's decision for one table: is ``drop < margin`` shown at ``confidence``?

    ``"exact"``: the exact p-value at the margin is ``<= alpha`` **and** the exact bound is ``<= margin`` (fail-closed:
    the two agree wherever the p-value is monotone in the hypothesised drop, and a table where they disagree is
    not certified). ``"score"``: Tango's bound is ``<= margin``. Never certifies when ``n == 0``.
    """
    b, c, n = _check_table(b, c, n)
    _check_confidence(confidence, one_sided=True)
    margin = _check_margin(margin)
    _check_test(test)
    if n == 0:
        return False
    if test == "score":
        return _upper(b, c, n, z_value(confidence)) <= margin
    return _exact_certifies(b, c, n, margin, float(confidence))


def _exact_certifies(b: int, c: int, n: int, margin: float, confidence: float) -> bool:
    alpha = 1.0 - confidence
    if not _exact_rejects(b, c, n, margin, exact_gamma(alpha), alpha):
        return False
    return _exact_bound_at_most(b, c, n, confidence, margin)


def _last_true(pred: Callable[[int], bool], guess: int, top: int) -> int:
    """The largest k in ``[-1, top]`` with ``pred(k)``, for a predicate true up to some k and false after it
    (``pred(-1)`` is taken as true): gallop from ``guess``, then bisect."""
    guess = min(max(guess, -1), top)
    if guess >= 0 and not pred(guess):
        hi, step = guess, 1  # pred(hi) is false
        while True:
            lo = max(-1, hi - step)
            if lo < 0 or pred(lo):
                break
            hi, step = lo, 2 * step
    else:
        lo, step = guess, 1  # pred(lo) is true
        while True:
            hi = min(top + 1, lo + step)
            if hi > top or not pred(hi):
                break
            lo, step = hi, 2 * step
    while hi - lo > 1:  # pred(lo) true (or lo = -1), pred(hi) false (or hi = top + 1)
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


@lru_cache(maxsize=1 << 16)
def _exact_column_p(n: int, margin: float, confidence: float, c: int) -> int:
    """The largest ``b`` whose exact p-value at the margin is ``<= alpha`` in column ``c`` (-1 if none). The p-value is
    non-decreasing in ``b`` at fixed ``c`` (proved: "at least as extreme" grows with ``b`` and the nuisance interval
    depends on ``c`` only), so this is found by galloping from Tango's own region and bisecting."""
    alpha = 1.0 - confidence
    gamma = exact_gamma(alpha)
    m = n - c
    t = score_statistic(np.arange(m + 1), c, n, margin)
    exceed = t > -z_value(confidence)
    guess = int(exceed.argmax()) - 1 if exceed.any() else m
    return _last_true(lambda k: _exact_rejects(k, c, n, margin, gamma, alpha), guess, m)


@lru_cache(maxsize=1 << 16)
def _exact_column(n: int, margin: float, confidence: float, c: int) -> int:
    """The exact test's rejection region in column ``c``: the largest ``b`` it certifies (-1 if none), for the size
    and power computations: from :func:`_exact_column_p`, the fail-closed bound check steps down until it holds."""
    b = _exact_column_p(n, margin, confidence, c)
    while b >= 0 and not _exact_bound_at_most(b, c, n, confidence, margin):
        b -= 1
    return b


def exact_region(n: int, margin: float, confidence: float, c_max: int | None = None) -> np.ndarray:
    """``b_max[c]`` for ``c = 0 .. c_max`` (default n): the largest negative-flip count the exact test certifies with
    ``c`` positive flips among n images (-1: none). The certificate's decision is ``b <= b_max[c]`` (checked on a
    grid by the tests); each column is cached."""
    n = int(n)
    _check_confidence(confidence, one_sided=True)
    margin = _check_margin(margin)
    c_max = n if c_max is None else min(int(c_max), n)
    return np.array([_exact_column(n, margin, float(confidence), c) for c in range(c_max + 1)], dtype=np.int64)


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


def needed_n(b_rate: float, c_rate: float, margin: float, confidence: float, power: float = 0.8,
             test: Test = DEFAULT_TEST) -> int | None:
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


def _exact_power_at_least(b_rate: float, c_rate: float, m: int, margin: float, confidence: float,
                          power: float) -> bool:
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


def is_inconclusive(n: int, tolerance: float, confidence: float, test: Test = DEFAULT_TEST) -> bool:
    """True when ``n`` is below :func:`min_informative_n` for ``test`` (or zero)."""
    return n <= 0 or n < min_informative_n(tolerance, confidence, test)


def clear_caches() -> None:
    """Forget every cached p-value, bound walk, score grid and rejection region (for timing a cold start; results
    never depend on what was cached)."""
    global _grid_cells
    for f in (_nuisance_interval, _reach, _columns, _exact_p, _exact_rejects, _exact_column_p, _exact_column,
              _exact_needed_n, _min_informative_n):
        f.cache_clear()
    _grid_cache.clear()
    _grid_cells = 0


# ---------------------------------------------------------------------------------- exact operating curve
def _exact_power(p_b: float, p_c: float, n: int, margin: float, confidence: float, mass: float,
                 fail_closed: bool) -> tuple[float, float]:
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


def certification_probability(p_b: float, p_c: float, n: int, margin: float, confidence: float,
                              test: Test = DEFAULT_TEST) -> float:
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
