"""The certificate's statistics against published values, an independent brute force, exact enumeration and
simulation. Everything here is numpy/scipy; each test runs in well under a second except the simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy.stats import binom, binomtest, norm

from safespec import stats

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


@pytest.mark.parametrize("n,margin,p_c", [(100, 0.03, 0.0), (200, 0.03, 0.005), (400, 0.03, 0.02),
                                          (400, 0.01, 0.0), (150, 0.05, 0.05), (400, 0.0, 0.01)])
def test_simulated_false_certification_rate_stays_below_alpha(n, margin, p_c):
    """Tables whose true drop exceeds the tolerance (by half a point) must be certified at most alpha of the time."""
    rng = np.random.default_rng(20240611)
    tables, alpha = 4000, 0.05
    p_b = p_c + margin + 0.005
    share = _simulated_share_certified(p_b, p_c, n, margin, 0.95, tables, rng)
    mc = 3 * math.sqrt(alpha * (1 - alpha) / tables)
    assert share <= alpha + mc, share
    # The exact probability agrees with the simulation, which also checks the enumeration.
    exact = stats.certification_probability(p_b, p_c, n, margin, 0.95)
    assert abs(share - exact) <= 4 * math.sqrt(max(exact, 1e-3) * (1 - exact) / tables) + 1e-3


def test_exact_size_beyond_and_at_the_margin():
    """Exact type I error of the score test. One point past the margin it is below alpha everywhere on the grid;
    exactly on the margin the asymptotic test oscillates around alpha (documented: at most about 6% at 95%)."""
    worst_at, worst_beyond = 0.0, 0.0
    for n in (30, 100, 200, 400):
        for margin in (0.01, 0.03, 0.05, 0.1):
            for p_c in (0.0, 0.002, 0.01, 0.03, 0.1):
                worst_at = max(worst_at, stats.certification_probability(margin + p_c, p_c, n, margin, 0.95))
                worst_beyond = max(worst_beyond,
                                   stats.certification_probability(margin + 0.01 + p_c, p_c, n, margin, 0.95))
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
    assert stats.certification_probability(margin, 0.0, n, margin, 0.95) <= 0.05


# ------------------------------------------------------------------------------------- sample size
@pytest.mark.parametrize("p_b,p_c,margin", [(0.02, 0.02, 0.03), (0.01, 0.03, 0.0), (0.05, 0.04, 0.03),
                                            (0.1, 0.1, 0.05), (0.01, 0.0, 0.03)])
def test_needed_n_gives_the_requested_power(p_b, p_c, margin):
    n = stats.needed_n(p_b, p_c, margin, 0.95, power=0.8)
    assert n is not None
    power = stats.certification_probability(p_b, p_c, n, margin, 0.95)
    assert 0.72 <= power <= 0.88, power
    # and clearly less power at half the size
    assert stats.certification_probability(p_b, p_c, n // 2, margin, 0.95) < power - 0.1


def test_needed_n_edge_cases_and_monotonicity():
    assert stats.needed_n(0.04, 0.01, 0.03, 0.95) is None  # truly 3 points worse: never certifiable
    assert stats.needed_n(0.0, 0.0, 0.0, 0.95) is None  # unchanged model, zero tolerance
    # An unchanged model needs exactly the smallest informative n.
    assert stats.needed_n(0.0, 0.0, 0.03, 0.95) == stats.min_informative_n(0.03, 0.95)
    ns = [stats.needed_n(0.02, 0.01, m, 0.95) for m in (0.015, 0.02, 0.03, 0.05)]
    assert all(x > y for x, y in zip(ns, ns[1:]))
    assert stats.needed_n(0.02, 0.01, 0.03, 0.95, power=0.9) > stats.needed_n(0.02, 0.01, 0.03, 0.95, power=0.8)
    assert stats.needed_n(0.02, 0.01, 0.03, 0.99) > stats.needed_n(0.02, 0.01, 0.03, 0.95)


def test_min_informative_n():
    for tol in (0.01, 0.03, 0.05, 0.2, 1.0):
        for conf in (0.9, 0.95, 0.99):
            m = stats.min_informative_n(tol, conf)
            assert stats.drop_upper_bound(0, 0, m, conf) <= tol
            if m > 1:
                assert stats.drop_upper_bound(0, 0, m - 1, conf) > tol
                assert stats.is_inconclusive(m - 1, tol, conf)
            assert not stats.is_inconclusive(m, tol, conf)
    assert stats.min_informative_n(0.03, 0.95) == 88  # ceil(1.6449^2 * 0.97 / 0.03)
    # tolerance 0: the smallest n at which gaining every image certifies
    m0 = stats.min_informative_n(0.0, 0.95)
    assert m0 == 3
    assert stats.drop_upper_bound(0, m0, m0, 0.95) <= 0.0 < stats.drop_upper_bound(0, m0 - 1, m0 - 1, 0.95)
    assert stats.is_inconclusive(0, 0.5, 0.95)
