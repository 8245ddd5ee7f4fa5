"""The certificate's statistics against published values, an independent brute force, exact enumeration and
simulation. Everything here is numpy/scipy; each test runs in well under a second except the simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy.stats import binom, binomtest, norm

from safespec.certify import stats

# ------------------------------------------------------------------------------------------ known values
# Tango score intervals for the paired difference (b - c) / n, as published (3 decimals). Tables are
# (both, b, c, neither) in the order the sources print them; the difference is p1 - p2 = (b - c) / n.
PUBLISHED = [
    # the Tango-method examples of the ratesci R package's test suite: n = 44 at 90%, and n = 32
    ((43, 0, 1, 0), 0.90, (-0.096, 0.037)),
    ((4, 9, 3, 16), 0.95, (-0.027, 0.390)),
    # Agresti & Min (2005), n = 86
    ((53, 16, 8, 9), 0.95, (-0.020, 0.207)),
    # Fagerland, Lydersen & Laake (2014), airway hyper-responsiveness (Bentur et al. 2009), n = 21
    ((1, 1, 7, 12), 0.95, (-0.517, -0.026)),
]


@pytest.mark.parametrize("table,level,expected", PUBLISHED)
def test_tango_interval_matches_published_examples(table, level, expected):
    _, b, c, _ = table
    lo, hi = stats.drop_interval(b, c, sum(table), level)
    assert (round(lo, 3), round(hi, 3)) == expected


@pytest.mark.parametrize("n", [1, 10, 88, 400, 5000])
def test_bound_of_a_table_without_flips_has_the_closed_form(n):
    # With b = c = 0 the restricted MLE of p_c is 0 and T(d) = -sqrt(n d / (1 - d)): the bound is z^2 / (n + z^2).
    z = norm.ppf(0.95)
    assert stats.drop_upper_bound(0, 0, n, 0.95) == pytest.approx(z * z / (n + z * z), abs=1e-10)


def test_pvalue_at_zero_margin_is_mcnemar():
    # At margin 0, Tango's statistic reduces to McNemar's (b - c) / sqrt(b + c).
    for b, c in [(3, 9), (10, 4), (25, 25), (0, 5)]:
        assert stats.noninferiority_pvalue(b, c, 200, 0.0) == pytest.approx(norm.cdf((b - c) / math.sqrt(b + c)))


def _brute_force_upper(b, c, n, confidence):
    """Independent reimplementation: the restricted MLE by numerical maximisation of the trinomial likelihood
    (no closed form), the score statistic from it, and the bound as the largest point of a grid (refined once
    around the crossing) that the test does not reject. Only drops above the estimate matter: T is 0 there."""
    z = norm.ppf(confidence)
    m = n - b - c

    def stat(d):
        lo, hi = max(0.0, -d), (1.0 - d) / 2.0

        def nll(p):
            val = 0.0
            for cnt, prob in ((b, p + d), (c, p), (m, 1.0 - 2.0 * p - d)):
                if cnt:
                    val -= cnt * math.log(max(prob, 1e-300))
            return val

        p = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-13}).x
        var = n * (2 * p + d * (1 - d))
        return (b - c - n * d) / math.sqrt(var) if var > 0 else 0.0

    grid = np.linspace((b - c) / n, 0.9999, 401)
    ok = [d for d in grid if stat(d) >= -z]
    last = max(ok)
    fine = np.linspace(last, min(last + (grid[1] - grid[0]), 0.9999), 201)
    ok = [d for d in fine if stat(d) >= -z]
    return max(ok), fine[1] - fine[0]


@pytest.mark.parametrize("b,c,n", [(0, 0, 30), (3, 1, 40), (0, 6, 25), (7, 0, 50), (12, 9, 60), (2, 5, 400)])
def test_bound_matches_independent_brute_force(b, c, n):
    brute, step = _brute_force_upper(b, c, n, 0.95)
    assert stats.drop_upper_bound(b, c, n, 0.95) == pytest.approx(brute, abs=2 * step + 1e-9)


def test_score_statistic_is_decreasing_in_the_hypothesised_drop():
    # The bound is found by root-finding, which is only right if T is monotone; check it on a dense grid.
    d = np.linspace(-0.999, 0.999, 2001)
    for n in (5, 37, 200):
        for b in range(0, n + 1, max(1, n // 12)):
            for c in range(0, n + 1 - b, max(1, n // 12)):
                t = stats.score_statistic(b, c, n, d)
                assert np.all(np.diff(t) <= 1e-12), (b, c, n)


# --------------------------------------------------------------------------------------------- edge cases
def test_edge_cases():
    assert stats.drop_upper_bound(0, 0, 0, 0.95) == 1.0  # nothing observed
    assert stats.drop_upper_bound(10, 0, 10, 0.95) == 1.0  # every image lost
    lo, hi = stats.drop_interval(0, 10, 10, 0.95)  # every image gained
    assert lo == -1.0 and -1.0 < hi < 0.0
    assert 0.0 < stats.drop_upper_bound(0, 0, 1, 0.95) < 1.0
    assert stats.drop_lower_bound(3, 1, 40, 0.95) == pytest.approx(-stats.drop_upper_bound(1, 3, 40, 0.95))
    assert stats.noninferiority_pvalue(0, 0, 0, 0.03) == 1.0
    for bad in [(-1, 0, 5), (3, 3, 5), (1.5, 0, 5)]:
        with pytest.raises(ValueError):
            stats.drop_upper_bound(*bad, 0.95)
    for conf in (0.5, 1.0, 0.2):
        with pytest.raises(ValueError):
            stats.drop_upper_bound(1, 1, 10, conf)


def test_bound_is_above_the_point_estimate_and_below_one():
    for b, c, n in [(0, 0, 5), (5, 1, 100), (1, 5, 100), (50, 0, 60), (0, 59, 60)]:
        u = stats.drop_upper_bound(b, c, n, 0.95)
        assert (b - c) / n < u <= 1.0


# ------------------------------------------------------------------------------------------- monotonicity
def test_bound_decreases_as_n_grows_at_fixed_rates():
    bounds = [stats.drop_upper_bound(2 * k, k, 100 * k, 0.95) for k in (1, 2, 4, 8, 16, 32)]
    assert all(x > y for x, y in zip(bounds, bounds[1:]))
    # and converges to the true drop of 0.01 at the 1/sqrt(n) rate (32x the images: about 1/5.7 the excess)
    assert bounds[-1] - 0.01 < (bounds[0] - 0.01) / 4


def test_bound_increases_with_negative_flips_and_decreases_with_positive_flips():
    up = [stats.drop_upper_bound(b, 3, 400, 0.95) for b in range(0, 30)]
    assert all(x < y for x, y in zip(up, up[1:]))
    down = [stats.drop_upper_bound(8, c, 400, 0.95) for c in range(0, 30)]
    assert all(x > y for x, y in zip(down, down[1:]))


def test_bound_increases_with_confidence():
    bs = [stats.drop_upper_bound(6, 2, 300, q) for q in (0.8, 0.9, 0.95, 0.99, 0.999)]
    assert all(x < y for x, y in zip(bs, bs[1:]))


# ------------------------------------------------------------------------------- bound / p-value agree
def test_bound_below_margin_iff_pvalue_below_alpha_on_a_grid():
    checked = 0
    for n in (20, 75, 400):
        for b in range(0, min(n, 40) + 1, 3):
            for c in range(0, min(n - b, 30) + 1, 4):
                for conf in (0.9, 0.99):
                    u = stats.drop_upper_bound(b, c, n, conf)
                    for margin in (0.0, 0.01, 0.03, 0.05, 0.1, 0.2):
                        if abs(u - margin) < 1e-9:
                            continue  # on the margin to root-finding precision: either answer is right
                        p = stats.noninferiority_pvalue(b, c, n, margin)
                        assert (u < margin) == (p < 1 - conf), (b, c, n, conf, margin, u, p)
                        checked += 1
    assert checked > 2500


# ------------------------------------------------------------------------------------------ Clopper-Pearson
@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (7, 20), (20, 20), (380, 400), (3, 1000)])
def test_clopper_pearson_matches_scipy_exact(k, n):
    for conf in (0.9, 0.95, 0.99):
        ci = binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
        lo, hi = stats.clopper_pearson_interval(k, n, conf)
        assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
        lower = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=conf, method="exact").low
        upper = binomtest(k, n, alternative="less").proportion_ci(confidence_level=conf, method="exact").high
        assert stats.clopper_pearson(k, n, conf, "lower") == pytest.approx(lower, abs=1e-12)
        assert stats.clopper_pearson(k, n, conf, "upper") == pytest.approx(upper, abs=1e-12)


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.clopper_pearson(11, 10, 0.95, "lower")
    with pytest.raises(ValueError):
        stats.clopper_pearson(1, 10, 0.95, "middle")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- error control
def _simulated_share_certified(p_b, p_c, n, margin, conf, tables, rng):
    counts = rng.multinomial(n, [p_b, p_c, 1.0 - p_b - p_c], size=tables)[:, :2]
    uniq, inv = np.unique(counts, axis=0, return_inverse=True)
    bounds = np.array([stats.drop_upper_bound(int(b), int(c), n, conf) for b, c in uniq])
    return float(np.mean(bounds[inv.ravel()] <= margin))


@pytest.mark.parametrize(
    "n,margin,p_c",
    [(100, 0.03, 0.0), (200, 0.03, 0.005), (400, 0.03, 0.02), (400, 0.01, 0.0), (150, 0.05, 0.05), (400, 0.0, 0.01)],
)
def test_simulated_false_certification_rate_stays_below_alpha(n, margin, p_c):
    """Tables whose true drop exceeds the tolerance (by half a point) must be certified at most alpha of the time."""
    rng = np.random.default_rng(20240611)
    tables, alpha = 4000, 0.05
    p_b = p_c + margin + 0.005
    share = _simulated_share_certified(p_b, p_c, n, margin, 0.95, tables, rng)
    mc = 3 * math.sqrt(alpha * (1 - alpha) / tables)
    assert share <= alpha + mc, share
    # The exact probability agrees with the simulation, which also checks the enumeration.
    exact = stats.certification_probability(p_b, p_c, n, margin, 0.95, test="score")
    assert abs(share - exact) <= 4 * math.sqrt(max(exact, 1e-3) * (1 - exact) / tables) + 1e-3


def test_exact_size_beyond_and_at_the_margin():
    """Exact type I error of the score test. One point past the margin it is below alpha everywhere on the grid;
    exactly on the margin the asymptotic test oscillates around alpha (documented: at most about 6% at 95%)."""
    worst_at, worst_beyond = 0.0, 0.0
    for n in (30, 100, 200, 400):
        for margin in (0.01, 0.03, 0.05, 0.1):
            for p_c in (0.0, 0.002, 0.01, 0.03, 0.1):
                worst_at = max(worst_at, stats.certification_probability(margin + p_c, p_c, n, margin, 0.95, "score"))
                worst_beyond = max(
                    worst_beyond, stats.certification_probability(margin + 0.01 + p_c, p_c, n, margin, 0.95, "score")
                )
    assert worst_beyond <= 0.05
    assert 0.04 < worst_at <= 0.065


def test_wald_is_more_lenient_than_tango_at_small_counts():
    # A perfect table: Wald's bound is 0, so it would certify a single image; Tango's is not.
    assert stats.wald_drop_upper_bound(0, 0, 1, 0.95) == 0.0
    assert stats.drop_upper_bound(0, 0, 1, 0.95) > 0.7
    # At 400 images and a 3-point margin, tables Wald certifies and Tango does not.
    tables = [(b, c) for b in range(0, 30) for c in range(0, 20)]
    tango = {t: stats.drop_upper_bound(*t, 400, 0.95) for t in tables}
    wald = {t: stats.wald_drop_upper_bound(*t, 400, 0.95) for t in tables}
    wald_only = [t for t in tables if wald[t] <= 0.03 < tango[t]]
    assert (8, 2) in wald_only and (7, 0) in wald_only
    assert not [t for t in tables if tango[t] <= 0.03 < wald[t]]
    # Its actual type I error at the margin with few flips: far above 5% (the exact enumeration, done for Wald).
    n, margin, z = 100, 0.03, norm.ppf(0.95)
    B, C = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    feasible = B + C <= n
    prob = binom.pmf(B, n, margin) * np.where(feasible, binom.pmf(C, np.maximum(n - B, 0), 0.0), 0.0)
    d = (B - C) / n
    wald = d + z * np.sqrt(np.maximum((B + C) / n - d * d, 0.0) / n)
    assert float(np.sum(prob * (feasible & (wald <= margin)))) > 0.15
    assert stats.certification_probability(margin, 0.0, n, margin, 0.95, "score") <= 0.05


# ------------------------------------------------------------------------------------- sample size
@pytest.mark.parametrize(
    "p_b,p_c,margin", [(0.02, 0.02, 0.03), (0.01, 0.03, 0.0), (0.05, 0.04, 0.03), (0.1, 0.1, 0.05), (0.01, 0.0, 0.03)]
)
def test_needed_n_gives_the_requested_power(p_b, p_c, margin):
    """Tango's test: Nam's asymptotic size gives about the requested power (discreteness moves it)."""
    n = stats.needed_n(p_b, p_c, margin, 0.95, power=0.8, test="score")
    assert n is not None
    power = stats.certification_probability(p_b, p_c, n, margin, 0.95, "score")
    assert 0.72 <= power <= 0.88, power
    # and clearly less power at half the size
    assert stats.certification_probability(p_b, p_c, n // 2, margin, 0.95, "score") < power - 0.1


@pytest.mark.parametrize("test", ["score", "exact"])
def test_needed_n_edge_cases(test):
    assert stats.needed_n(0.04, 0.01, 0.03, 0.95, test=test) is None  # truly 3 points worse: never certifiable
    assert stats.needed_n(0.0, 0.0, 0.0, 0.95, test=test) is None  # unchanged model, zero tolerance
    # An unchanged model needs exactly the smallest informative n of the same test.
    assert stats.needed_n(0.0, 0.0, 0.03, 0.95, test=test) == stats.min_informative_n(0.03, 0.95, test)
    with pytest.raises(ValueError):
        stats.needed_n(0.01, 0.0, 0.03, 0.95, power=1.0, test=test)


def test_needed_n_monotonicity():
    ns = [stats.needed_n(0.02, 0.01, m, 0.95, test="score") for m in (0.015, 0.02, 0.03, 0.05)]
    assert all(x > y for x, y in zip(ns, ns[1:]))
    assert stats.needed_n(0.02, 0.01, 0.03, 0.95, power=0.9, test="score") > stats.needed_n(
        0.02, 0.01, 0.03, 0.95, test="score"
    )
    assert stats.needed_n(0.02, 0.01, 0.03, 0.99, test="score") > stats.needed_n(0.02, 0.01, 0.03, 0.95, test="score")
    # the exact test's: more images for a tighter tolerance
    assert stats.needed_n(0.01, 0.0, 0.03, 0.95) > stats.needed_n(0.01, 0.0, 0.05, 0.95)


def test_min_informative_n():
    for tol in (0.01, 0.03, 0.05, 0.2, 1.0):
        for conf in (0.9, 0.95, 0.99):
            m = stats.min_informative_n(tol, conf, "score")
            assert stats.drop_upper_bound(0, 0, m, conf) <= tol
            if m > 1:
                assert stats.drop_upper_bound(0, 0, m - 1, conf) > tol
                assert stats.is_inconclusive(m - 1, tol, conf, "score")
            assert not stats.is_inconclusive(m, tol, conf, "score")
    assert stats.min_informative_n(0.03, 0.95, "score") == 88  # ceil(1.6449^2 * 0.97 / 0.03)
    # tolerance 0: the smallest n at which gaining every image certifies
    m0 = stats.min_informative_n(0.0, 0.95, "score")
    assert m0 == 3
    assert stats.drop_upper_bound(0, m0, m0, 0.95) <= 0.0 < stats.drop_upper_bound(0, m0 - 1, m0 - 1, 0.95)
    assert stats.is_inconclusive(0, 0.5, 0.95)


# ------------------------------------------------------------------------------ the exact unconditional test
ALPHA = 0.05


def test_score_statistic_is_non_decreasing_in_b_at_fixed_c():
    """The exact test's reduction to the null boundary needs "at least as extreme" to be a lower set in b at
    every c: Tango's statistic must not decrease as b grows. Checked for every feasible table."""
    for n in (1, 2, 5, 30, 57, 200, 400):
        B, C = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        both = B[1:] + C[1:] <= n  # (b, c) and (b + 1, c) are both tables
        for delta in np.concatenate([np.linspace(-0.98, 0.98, 50), [0.0, 1e-6, 0.01, 0.02, 0.03, 0.05, 0.1]]):
            t = stats.score_statistic(B, C, n, delta)
            step = np.where(both, t[1:] - t[:-1], 0.0)
            assert np.all(step >= -1e-12 * np.maximum(1.0, np.abs(t[1:]))), (n, delta)


def _brute_exact_pvalue(b, c, n, delta, gamma, points=2001):
    """Independent reimplementation for small n: every table enumerated (no truncation, no running maximum),
    the nuisance interval from scipy's binomtest, and the supremum as the maximum over a dense grid."""
    B, C = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    feasible = B + C <= n
    t = stats.score_statistic(B, C, n, delta)
    region = feasible & (t <= t[b, c] + 1e-10 * max(1.0, abs(t[b, c])))
    ci = binomtest(c, n).proportion_ci(confidence_level=1 - gamma, method="exact")
    lo, hi = max(ci.low, max(0.0, -delta)), min(ci.high, (1 - delta) / 2)
    if lo > hi:
        return gamma
    best = 0.0
    for p in np.linspace(lo, hi, points):
        q = min(1.0, (p + delta) / (1 - p))
        prob = binom.pmf(C, n, p) * binom.pmf(B, np.maximum(n - C, 0), q)
        best = max(best, float(np.sum(np.where(region, prob, 0.0))))
    return min(1.0, best + gamma)


@pytest.mark.parametrize(
    "b,c,n,delta",
    [(0, 0, 12, 0.1), (1, 0, 20, 0.05), (3, 2, 20, 0.05), (2, 5, 25, 0.0), (6, 1, 25, 0.1), (4, 4, 16, -0.05)],
)
def test_exact_pvalue_matches_a_brute_force_enumeration(b, c, n, delta):
    p = stats.exact_pvalue(b, c, n, delta)
    brute = _brute_exact_pvalue(b, c, n, delta, stats.EXACT_GAMMA)
    # the refined supremum is at least the dense grid's maximum, and not more than a grid's resolution above it
    assert brute - 1e-12 <= p <= brute + 1e-6, (p, brute)


def test_exact_pvalue_properties():
    g = stats.EXACT_GAMMA
    for n in (1, 10, 100, 400):
        for delta in (0.0, 0.03, 0.1):
            # the null point p_c = 0 alone gives (1 - delta)^n for a table without flips
            assert stats.exact_pvalue(0, 0, n, delta) >= min(1.0, (1 - delta) ** n + g) - 1e-12
    ps = [stats.exact_pvalue(b, 2, 200, 0.03) for b in range(0, 25)]
    assert all(x <= y for x, y in zip(ps, ps[1:]))  # more negative flips: less evidence
    assert g <= min(ps) and max(ps) <= 1.0
    assert stats.exact_pvalue(0, 0, 0, 0.03) == 1.0  # nothing observed
    assert stats.exact_pvalue(3, 1, 50, 1.0) == g  # the null "everything flips" is refuted by one unflipped image
    assert stats.exact_gamma(0.05) == g and stats.exact_gamma(0.001) == pytest.approx(1e-4)
    for bad in ((-1, 0, 5, 0.03), (1, 0, 5, 1.5), (True, 0, 5, 0.03)):
        with pytest.raises(ValueError):
            stats.exact_pvalue(*bad)
    with pytest.raises(ValueError):
        stats.certifies(1, 0, 50, 0.03, 0.95, test="wald")  # type: ignore[arg-type]


def test_exact_size_is_at_most_alpha_on_a_grid():
    """The exact test's false-certification rate, computed exactly (trinomial enumeration over the rejection
    region), on the margin and inside the null, on a grid of sizes, tolerances and positive-flip rates."""
    worst, where = 0.0, None
    for n in (30, 50, 100, 200, 400):
        for tol in (0.02, 0.03, 0.05, 0.1):
            for p_c in (0.0, 0.01, 0.03):
                for beyond in (0.0, 0.005, 0.02):  # on the boundary, and inside the null
                    size = stats.certification_probability(p_c + tol + beyond, p_c, n, tol, 1 - ALPHA, "exact")
                    if size > worst:
                        worst, where = size, (n, tol, p_c, beyond)
    assert worst <= ALPHA, (worst, where)
    assert worst > 0.04, (worst, where)  # and not vacuously: somewhere it comes close to the level


def test_tango_exceeds_the_level_where_the_exact_test_does_not():
    """The comparison is real: at n = 200, tolerance 0.03, only negative flips, Tango's score test certifies a
    model exactly 3 points worse 5.9% of the time at a nominal 5%; the exact test stays below 5%."""
    score = stats.certification_probability(0.03, 0.0, 200, 0.03, 0.95, "score")
    exact = stats.certification_probability(0.03, 0.0, 200, 0.03, 0.95, "exact")
    assert score > 0.058 and exact <= 0.05
    # the two computations of the probability agree where the tests agree: an unchanged model at n = 400
    assert stats.certification_probability(0.0, 0.0, 400, 0.03, 0.95, "exact") == pytest.approx(1.0)
    assert stats.certification_probability(0.0, 0.0, 50, 0.03, 0.95, "exact") == 0.0  # 50 < 100 images


def test_exact_bound_and_decision_agree():
    """certifies() = p-value at the margin <= alpha and bound <= margin (fail-closed); where the p-value is
    monotone in the hypothesised drop the two halves agree, which holds on this whole grid; and the bound is the
    smallest drop the test rejects, to the bisection's 2^-24."""
    step = 2.0**-24
    checked = 0
    for n in (50, 400):
        for b in range(0, 31, 4):
            for c in range(0, 21, 5):
                u = stats.exact_drop_upper_bound(b, c, n, 0.95)
                assert (b - c) / n < u <= 1.0
                if u < 1.0:
                    assert stats.exact_pvalue(b, c, n, u) <= ALPHA < stats.exact_pvalue(b, c, n, u - step)
                for margin in (0.02, 0.03, 0.05, 0.1):
                    p = stats.exact_pvalue(b, c, n, margin)
                    cert = stats.certifies(b, c, n, margin, 0.95)
                    assert cert == (p <= ALPHA and u <= margin), (b, c, n, margin, p, u)
                    if abs(u - margin) > step:
                        assert (u <= margin) == (p <= ALPHA), (b, c, n, margin, p, u)
                        checked += 1
    assert checked > 300


def test_exact_region_is_the_certificates_decision():
    """The rejection region b <= b_max(c) behind certification_probability is exactly where certifies() says
    yes, and certification_probability is the sum over every table of its probability times that decision."""
    n, margin = 30, 0.05
    bmax = stats.exact_region(n, margin, 0.95)
    for c in range(n + 1):
        decided = [stats.certifies(b, c, n, margin, 0.95) for b in range(n - c + 1)]
        assert decided == [b <= bmax[c] for b in range(n - c + 1)], c
    # an unchanged 30-image set is not certified (59 images are needed at 5 points), two gains are; with 20 gains
    # or more every table is (b <= n - c)
    assert bmax[0] == -1 and bmax[2] == 0 and all(bmax[c] == n - c for c in range(20, n + 1))
    for p_b, p_c in ((0.05, 0.0), (0.05, 0.05), (0.15, 0.1)):
        brute = sum(
            binom.pmf(c, n, p_c) * binom.pmf(b, n - c, p_b / (1 - p_c))
            for c in range(n + 1)
            for b in range(n - c + 1)
            if b <= bmax[c]
        )
        assert stats.certification_probability(p_b, p_c, n, margin, 0.95) == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("p_b,p_c,margin", [(0.01, 0.0, 0.03), (0.02, 0.005, 0.05), (0.01, 0.01, 0.05)])
def test_exact_needed_n_is_consistent_with_the_exact_test(p_b, p_c, margin):
    n = stats.needed_n(p_b, p_c, margin, 0.95, power=0.8)
    assert n is not None
    assert stats.certification_probability(p_b, p_c, n, margin, 0.95, "exact") >= 0.8
    assert stats.certification_probability(p_b, p_c, n - 1, margin, 0.95, "exact") < 0.8
    # within a few percent of Nam's asymptotic size for Tango's test
    assert abs(n / stats.needed_n(p_b, p_c, margin, 0.95, power=0.8, test="score") - 1) < 0.1


def test_exact_min_informative_n():
    for tol in (0.01, 0.03, 0.05, 0.2, 1.0):
        for conf in (0.9, 0.95, 0.99):
            m = stats.min_informative_n(tol, conf)
            assert stats.certifies(0, 0, m, tol, conf)
            if m > 1:
                assert not stats.certifies(0, 0, m - 1, tol, conf)
                assert stats.is_inconclusive(m - 1, tol, conf)
            assert not stats.is_inconclusive(m, tol, conf)
            # no larger size stops certifying an unchanged model (checked a little way up)
            assert all(stats.certifies(0, 0, k, tol, conf) for k in range(m, m + 5))
    # (1 - 0.03)^n + 0.001 <= 0.05 needs n >= 100 at the null point p_c = 0 alone; Tango's bound says 88
    assert stats.min_informative_n(0.03, 0.95) == 100
    m0 = stats.min_informative_n(0.0, 0.95)
    assert stats.certifies(0, m0, m0, 0.0, 0.95) and not stats.certifies(0, m0 - 1, m0 - 1, 0.0, 0.95)
    # a 99.9% certificate is possible (gamma shrinks with alpha)
    assert stats.certifies(0, 0, stats.min_informative_n(0.03, 0.999), 0.03, 0.999)


def test_exact_bound_edge_cases_and_monotonicity():
    assert stats.exact_drop_upper_bound(0, 0, 0, 0.95) == 1.0
    assert stats.exact_drop_upper_bound(10, 0, 10, 0.95) == 1.0
    assert stats.upper_bound(4, 1, 200, 0.95, "score") == stats.drop_upper_bound(4, 1, 200, 0.95)
    assert stats.upper_bound(4, 1, 200, 0.95) == stats.exact_drop_upper_bound(4, 1, 200, 0.95)
    up = [stats.exact_drop_upper_bound(b, 2, 400, 0.95) for b in range(0, 12)]
    assert all(x < y for x, y in zip(up, up[1:]))
    down = [stats.exact_drop_upper_bound(6, c, 400, 0.95) for c in range(0, 12)]
    assert all(x > y for x, y in zip(down, down[1:]))
    by_conf = [stats.exact_drop_upper_bound(6, 2, 300, q) for q in (0.8, 0.9, 0.95, 0.99)]
    assert all(x < y for x, y in zip(by_conf, by_conf[1:]))
    # the exact bound of a table without flips sits above Tango's z^2 / (n + z^2), which is anti-conservative there
    assert stats.exact_drop_upper_bound(0, 0, 88, 0.95) > 0.03 >= stats.drop_upper_bound(0, 0, 88, 0.95)
    assert not stats.certifies(0, 0, 0, 0.03, 0.95)  # nothing observed, nothing certified


def test_exact_needed_n_takes_the_asymptotic_size_when_thousands_are_needed():
    """A table that needs thousands of images is answered by Nam's formula for the exact test too (the exact
    search's work grows with n), and below the cap the exact search runs."""
    big = stats.needed_n(16 / 400, 6 / 400, 0.03, 0.95)
    assert big > stats.EXACT_NEEDED_N_MAX and big == stats.needed_n(16 / 400, 6 / 400, 0.03, 0.95, test="score")
    small = stats.needed_n(6 / 400, 0.0, 0.03, 0.95)
    assert small <= stats.EXACT_NEEDED_N_MAX and small != stats.needed_n(6 / 400, 0.0, 0.03, 0.95, test="score")


def test_the_bounds_scalar_score_statistic_is_the_vectorised_one_bit_for_bit():
    """Tango's bound finds its root with a plain-float copy of the statistic; it must be the same function."""
    from safespec.certify.score import _score_scalar

    for n in (1, 7, 50, 200, 2000):
        for b in sorted({0, 1, 5, n // 3, n}):
            for c in sorted({0, 1, 3, n - b}):
                if b + c > n:
                    continue
                for d in [*np.linspace(-0.999, 0.999, 21), 0.0, 0.03, (b - c) / n]:
                    want = stats.score_statistic(b, c, n, d)
                    assert _score_scalar(float(b), float(c), float(n), float(d)) == want, (b, c, n, d)


@pytest.mark.parametrize("test", ["exact", "score"])
def test_the_flip_allowance_is_the_most_negative_flips_that_still_certify(test):
    """What a held-out split lets a capability lose (none gained), as the certificate itself decides it."""
    for n in (10, 99, 100, 200, 400, 1000):
        for tol in (0.03, 0.05):
            a = stats.flip_allowance(n, tol, 0.95, test)
            if n < stats.min_informative_n(tol, 0.95, test):
                assert a == -1
                continue
            assert a >= 0 and stats.certifies(a, 0, n, tol, 0.95, test)
            assert not stats.certifies(a + 1, 0, n, tol, 0.95, test)
            if test == "exact":
                assert a == stats.exact_region(n, tol, 0.95, c_max=0)[0]
    assert stats.flip_allowance(200, 0.03, 0.95) == 1 and stats.flip_allowance(400, 0.03, 0.95) == 6
    assert stats.flip_allowance(0, 0.03, 0.95) == -1
    for bad in ({"n": -1}, {"n": 2.5}, {"tolerance": 1.5}, {"confidence": 1.0}):
        args = {"n": 200, "tolerance": 0.03, "confidence": 0.95} | bad
        with pytest.raises(ValueError):
            stats.flip_allowance(args["n"], args["tolerance"], args["confidence"], test)
