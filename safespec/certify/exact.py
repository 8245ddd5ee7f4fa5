"""The exact unconditional test of a paired drop (Berger-Boos): the p-value maximised over the nuisance
flip rate within a Clopper-Pearson interval, its bound, and its acceptance region."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy import optimize
from scipy.special import bdtr, bdtrc, gammaln, xlog1py, xlogy
from scipy.stats import beta as _beta
from scipy.stats import binom as _binom

from .base import _EDGE, EXACT_GAMMA, _check_confidence, _check_margin, _check_table, z_value
from .score import _upper, score_statistic

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
_BOUND_XTOL = 2.0**-24
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


def _sup_tail(
    n: int, delta: float, bmax: np.ndarray, c_hi: int, lo: float, hi: float, stop: tuple[float, float] | None = None
) -> float:
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
        r = optimize.minimize_scalar(
            lambda x: -float(_tail([x], n, delta, bmax, c_hi)[0]),
            bounds=(a[j], b[j]),
            method="bounded",
            options={"xatol": _XATOL * (b[j] - a[j])},
        )
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


def clear_caches() -> None:
    """Forget this module's cached p-values, bound walks, score grids and rejection regions."""
    global _grid_cells
    for f in (_nuisance_interval, _reach, _columns, _exact_p, _exact_rejects, _exact_column_p, _exact_column):
        f.cache_clear()
    _grid_cache.clear()
    _grid_cells = 0
