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

from .base import (
    DEFAULT_TEST,
    EXACT_GAMMA,
    TESTS,
    Test,
    _check_confidence,
    _check_margin,
    _check_table,
    _check_test,
    z_value,
)
from .binomial import clopper_pearson, clopper_pearson_interval
from .exact import _exact_certifies, exact_drop_upper_bound, exact_gamma, exact_pvalue, exact_region
from .power import (
    EXACT_NEEDED_N_MAX,
    certification_probability,
    clear_caches,
    flip_allowance,
    is_inconclusive,
    min_informative_n,
    needed_n,
)
from .score import (
    _upper,
    drop_interval,
    drop_lower_bound,
    drop_upper_bound,
    noninferiority_pvalue,
    restricted_mle,
    score_statistic,
    wald_drop_upper_bound,
)

__all__ = [
    "DEFAULT_TEST",
    "EXACT_GAMMA",
    "EXACT_NEEDED_N_MAX",
    "TESTS",
    "Test",
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
    "flip_allowance",
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
