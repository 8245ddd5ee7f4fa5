"""The held-out certificate: per protected capability, a statistical statement about the accuracy drop; the verdict.

Inputs are deliberately only labels and the old and new model's predicted class indices on the held-out split.
Nothing about training (method, losses, multipliers, selection) can reach the certificate, so a model trained
anywhere, by anyone, is judged by the same rule, and a certificate can be recomputed from the predictions alone.

The statistics live in :mod:`safespec.certify.stats`; docs/statistics.md says which tests are used and why. The drop
bound comes from the exact unconditional test by default, or from Tango's asymptotic score test when the spec says
``certify.test: score``; the certificate's ``statistics`` block names the one used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..plan import Plan
from ..result import meets
from . import stats

_COMMON = {
    "accuracy_bounds": "Clopper-Pearson (one-sided)",
    "improvement_interval": "Tango score (two-sided)",
    "new_accuracy_interval": "Clopper-Pearson (two-sided)",
    "verdict": "intersection-union test over capabilities (each at its own confidence, no multiplicity correction)",
}

#: What result.json's ``statistics`` block says, per ``certify.test``: the tests actually used for each quantity.
STATISTICS_BY_TEST: dict[str, dict[str, str]] = {
    "exact": {
        "test": "exact",
        "drop_bound": (
            f"exact unconditional test (one-sided), ordered by Tango's score statistic, nuisance rate "
            f"maximised over a {1 - stats.EXACT_GAMMA:.1%} Clopper-Pearson interval (Berger-Boos, "
            f"gamma {stats.EXACT_GAMMA:g}); certified only when its p-value at the tolerance is at most "
            f"1 - confidence and its bound is within the tolerance"
        ),
        **_COMMON,
        "needed_n": (
            "smallest n found at which the exact test certifies with probability at least 0.8 at the "
            "observed flip rates (exact enumeration, searched from Nam's (1997) asymptotic size; above "
            f"{stats.EXACT_NEEDED_N_MAX:,} images Nam's size itself)"
        ),
        "inconclusive": (
            "not certified and fewer held-out images than the exact test needs to certify an unchanged model"
        ),
    },
    "score": {
        "test": "score",
        "drop_bound": "Tango score (one-sided)",
        **_COMMON,
        "needed_n": "Nam (1997) asymptotic sample size of the score test, power 0.8, at the observed flip rates",
        "inconclusive": "not certified and fewer held-out images than an unchanged model would need to be certified",
    },
}
#: The default test's block (``certify.test: exact``).
STATISTICS = STATISTICS_BY_TEST[stats.DEFAULT_TEST]


def statistics(test: str = stats.DEFAULT_TEST) -> dict[str, str]:
    """The ``statistics`` block for a certificate computed with ``test`` (a fresh dict)."""
    if test not in STATISTICS_BY_TEST:
        raise ValueError(f"certify.test must be one of {', '.join(STATISTICS_BY_TEST)}, got {test!r}")
    return dict(STATISTICS_BY_TEST[test])


NEEDED_N_POWER = 0.8


# --------------------------------------------------------------------------------------------- helpers
def _as_labels(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.mod(a, 1) == 0):
            raise ValueError(f"{name} must hold integer class indices")
        a = a.astype(np.int64)
    return a.astype(np.int64, copy=False)


def _check_inputs(labels, old_pred, new_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, old_pred, new_pred = (
        _as_labels(n, a) for n, a in (("labels", labels), ("old_pred", old_pred), ("new_pred", new_pred))
    )
    if not (labels.shape == old_pred.shape == new_pred.shape):
        raise ValueError(
            f"labels, old_pred and new_pred must have the same length, "
            f"got {labels.size}, {old_pred.size}, {new_pred.size}"
        )
    return labels, old_pred, new_pred


def _f(x: float | None) -> float | None:
    """A plain, finite Python float or None: result.json must never hold NaN, inf or numpy scalars."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = number of images of true class i predicted as j (int64, ``num_classes`` square)."""
    labels, pred = _as_labels("labels", labels), _as_labels("pred", pred)
    if labels.shape != pred.shape:
        raise ValueError(f"labels and pred must have the same length, got {labels.size} and {pred.size}")
    for name, a in (("labels", labels), ("pred", pred)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds a class index outside [0, {num_classes})")
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


@dataclass(frozen=True)
class PairedCounts:
    """The paired 2x2 table of old vs new correctness over a set of images."""

    both_right: int
    negative_flips: int  # b: old right, new wrong
    positive_flips: int  # c: old wrong, new right
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_right + self.negative_flips + self.positive_flips + self.both_wrong

    @property
    def old_correct(self) -> int:
        return self.both_right + self.negative_flips

    @property
    def new_correct(self) -> int:
        return self.both_right + self.positive_flips

    @property
    def old_accuracy(self) -> float | None:
        return self.old_correct / self.n if self.n else None

    @property
    def new_accuracy(self) -> float | None:
        return self.new_correct / self.n if self.n else None

    @property
    def accuracy_change(self) -> float | None:
        return (self.positive_flips - self.negative_flips) / self.n if self.n else None

    @property
    def drop(self) -> float | None:
        return (self.negative_flips - self.positive_flips) / self.n if self.n else None

    def __add__(self, other: PairedCounts) -> PairedCounts:
        return PairedCounts(
            self.both_right + other.both_right,
            self.negative_flips + other.negative_flips,
            self.positive_flips + other.positive_flips,
            self.both_wrong + other.both_wrong,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "old_accuracy": _f(self.old_accuracy),
            "new_accuracy": _f(self.new_accuracy),
            "negative_flips": self.negative_flips,
            "positive_flips": self.positive_flips,
            "both_right": self.both_right,
            "both_wrong": self.both_wrong,
        }


def paired_counts(
    labels: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray, mask: np.ndarray | None = None
) -> PairedCounts:
    """The paired table over the images selected by the boolean ``mask`` (all images when None)."""
    labels, old_pred, new_pred = _check_inputs(labels, old_pred, new_pred)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != labels.shape:
            raise ValueError(f"mask must be a boolean array of length {labels.size}")
        labels, old_pred, new_pred = labels[mask], old_pred[mask], new_pred[mask]
    return paired_from_correct(old_pred == labels, new_pred == labels)


def paired_from_correct(old_ok: np.ndarray, new_ok: np.ndarray) -> PairedCounts:
    """The paired table from which images each model got right. Flips are counted here and nowhere else:
    the certificate, selection's validation evidence and the run's per-class table all call this."""
    old_ok, new_ok = np.asarray(old_ok, dtype=bool), np.asarray(new_ok, dtype=bool)
    if old_ok.shape != new_ok.shape:
        raise ValueError(f"old and new correctness differ in shape: {old_ok.shape} vs {new_ok.shape}")
    return PairedCounts(
        both_right=int(np.sum(old_ok & new_ok)),
        negative_flips=int(np.sum(old_ok & ~new_ok)),
        positive_flips=int(np.sum(~old_ok & new_ok)),
        both_wrong=int(np.sum(~old_ok & ~new_ok)),
    )


def per_class_table(
    labels: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray, classes: Sequence[str]
) -> list[dict[str, Any]]:
    """One paired-table row per class, in class-index order (``{"class": name, "n": ..., ...}``), for the report's
    per-class section. Losses are not known here; the caller adds them."""
    labels, old_pred, new_pred = _check_inputs(labels, old_pred, new_pred)
    rows = []
    for k, name in enumerate(classes):
        t = paired_counts(labels, old_pred, new_pred, labels == k)
        rows.append({"class": name, **t.to_dict()})
    return rows


# ------------------------------------------------------------------------------------------- statistics
def status_of(
    t: PairedCounts, tolerance: float, confidence: float, test: stats.Test = stats.DEFAULT_TEST
) -> tuple[str, float | None]:
    """The status of one table and its drop bound, by ``test`` (``"exact"`` or ``"score"``).

    Order matters: a table the test certifies is *certified* at any n (the test is valid at every size, and
    positive flips can certify a small set); for the exact test that takes both its p-value at the tolerance
    (<= 1 - confidence) and its bound (<= tolerance), so a table where the two disagree, possible only where the
    exact p-value is not monotone in the hypothesised drop, is not certified (:func:`stats.certifies`). Otherwise a
    set too small for an unchanged model to be certified (by the same test) is *inconclusive* whatever its point
    estimate, since neither "preserved" nor "violated" would mean anything at that size; otherwise the point
    estimate decides between *preserved* and *violated*.
    """
    if t.n == 0:
        return "inconclusive", None
    b, c, n = t.negative_flips, t.positive_flips, t.n
    bound = stats.upper_bound(b, c, n, confidence, test)
    if stats.certifies(b, c, n, tolerance, confidence, test):
        return "certified", bound
    if stats.is_inconclusive(t.n, tolerance, confidence, test):
        return "inconclusive", bound
    if t.negative_flips - t.positive_flips > tolerance * t.n + 1e-9:  # in counts: 3 of 100 at 0.03 is within
        return "violated", bound
    return "preserved", bound


def _meets(status: str, require: str) -> bool:
    if require not in ("certified", "preserved"):
        raise ValueError(f"certify.require must be 'certified' or 'preserved', got {require!r}")
    return meets(status, require)


@dataclass(frozen=True)
class ClassResult:
    """One class inside a capability, judged at the capability's tolerance and confidence."""

    class_name: str
    table: PairedCounts
    drop_upper_bound: float | None
    status: str

    def to_dict(self) -> dict[str, Any]:
        t = self.table
        return {
            "class": self.class_name,
            "n": t.n,
            "old_accuracy": _f(t.old_accuracy),
            "new_accuracy": _f(t.new_accuracy),
            "negative_flips": t.negative_flips,
            "positive_flips": t.positive_flips,
            "drop_upper_bound": _f(self.drop_upper_bound),
            "status": self.status,
        }


@dataclass(frozen=True)
class CapabilityResult:
    """The certificate of one protected capability, judged on the pooled table of its classes."""

    name: str
    classes: tuple[str, ...]
    status: str
    meets_requirement: bool
    tolerance: float
    confidence: float
    table: PairedCounts
    drop_upper_bound: float | None
    new_accuracy_lower: float | None
    flip_rate_upper: float | None
    needed_n: int | None
    per_class: tuple[ClassResult, ...]
    against: str | None = None  # a drift budget's certificate: the ancestor it is judged against ('origin')

    def to_dict(self) -> dict[str, Any]:
        t = self.table
        extra = {} if self.against is None else {"against": self.against}
        return {
            "name": self.name,
            **extra,
            "classes": list(self.classes),
            "status": self.status,
            "meets_requirement": bool(self.meets_requirement),
            "tolerance": float(self.tolerance),
            "confidence": float(self.confidence),
            "n": t.n,
            "old_accuracy": _f(t.old_accuracy),
            "new_accuracy": _f(t.new_accuracy),
            "accuracy_change": _f(t.accuracy_change),
            "drop_upper_bound": _f(self.drop_upper_bound),
            "new_accuracy_lower": _f(self.new_accuracy_lower),
            "flip_rate_upper": _f(self.flip_rate_upper),
            "negative_flips": t.negative_flips,
            "positive_flips": t.positive_flips,
            "both_right": t.both_right,
            "both_wrong": t.both_wrong,
            "needed_n": None if self.needed_n is None else int(self.needed_n),
            "per_class": [c.to_dict() for c in self.per_class],
        }


@dataclass(frozen=True)
class TargetResult:
    """The target class: how much it improved, with intervals, and whether the spec's goal is met.

    ``goal_met`` reads the point estimates (the goal as a developer states it); ``goal_met_with_confidence``
    reads the lower ends of the two-sided intervals, for reviewers who want the improvement itself certified.
    Neither enters the verdict, which is about safety only.
    """

    class_name: str
    table: PairedCounts
    confidence: float
    improvement_interval: tuple[float, float] | None
    new_accuracy_interval: tuple[float, float] | None
    min_accuracy: float | None
    min_improvement: float | None
    goal_met: bool
    goal_met_with_confidence: bool

    def to_dict(self) -> dict[str, Any]:
        t = self.table

        def pair(p):
            return None if p is None else [_f(p[0]), _f(p[1])]

        return {
            "class": self.class_name,
            "n": t.n,
            "old_accuracy": _f(t.old_accuracy),
            "new_accuracy": _f(t.new_accuracy),
            "improvement": _f(t.accuracy_change),
            "improvement_interval": pair(self.improvement_interval),
            "new_accuracy_interval": pair(self.new_accuracy_interval),
            "confidence": float(self.confidence),
            "goal": {"min_accuracy": _f(self.min_accuracy), "min_improvement": _f(self.min_improvement)},
            "goal_met": bool(self.goal_met),
            "goal_met_with_confidence": bool(self.goal_met_with_confidence),
        }


@dataclass(frozen=True)
class Certificate:
    """Everything the verdict rests on. The verdict is derived, never stored, so it cannot disagree with the
    capabilities it summarises."""

    capabilities: tuple[CapabilityResult, ...]
    target: TargetResult
    require: str
    statistics: dict[str, str] = field(default_factory=statistics, compare=False)

    @property
    def verdict(self) -> str:
        """``certified`` iff every capability meets the requirement: an intersection-union test, so each
        capability is tested at its own level and no multiplicity correction is needed (or allowed to help)."""
        return "certified" if all(c.meets_requirement for c in self.capabilities) else "not_certified"

    @property
    def success(self) -> bool:
        """The whole development cycle succeeded: safe (verdict certified) and the target goal met."""
        return self.verdict == "certified" and self.target.goal_met

    def to_dict(self) -> dict[str, Any]:
        """The result.json fragment ``{verdict, require, capabilities, target, statistics}``."""
        return {
            "verdict": self.verdict,
            "require": self.require,
            "capabilities": [c.to_dict() for c in self.capabilities],
            "target": self.target.to_dict(),
            "statistics": dict(self.statistics),
        }


# --------------------------------------------------------------------------------------------- certify
def _certify_capability(constraint, labels, old_pred, new_pred, require: str, test: stats.Test) -> CapabilityResult:
    tol, conf = float(constraint.tolerance), float(constraint.confidence)
    per_class = []
    pooled = PairedCounts(0, 0, 0, 0)
    for name, k in zip(constraint.classes, constraint.class_indices):
        t = paired_counts(labels, old_pred, new_pred, labels == k)
        status, bound = status_of(t, tol, conf, test)
        per_class.append(ClassResult(name, t, bound, status))
        pooled = pooled + t
    status, bound = status_of(pooled, tol, conf, test)
    n = pooled.n
    acc_lower: float | None = None
    flip_upper: float | None = None
    if n:
        acc_lower = stats.clopper_pearson(pooled.new_correct, n, conf, "lower")
        flip_upper = stats.clopper_pearson(pooled.negative_flips, n, conf, "upper")
    needed: int | None = None
    if status != "certified" and n:
        needed = stats.needed_n(pooled.negative_flips / n, pooled.positive_flips / n, tol, conf, NEEDED_N_POWER, test)
    return CapabilityResult(
        name=constraint.name,
        classes=tuple(constraint.classes),
        status=status,
        meets_requirement=_meets(status, require),
        tolerance=tol,
        confidence=conf,
        table=pooled,
        drop_upper_bound=bound,
        new_accuracy_lower=acc_lower,
        flip_rate_upper=flip_upper,
        needed_n=needed,
        per_class=tuple(per_class),
    )


def _certify_target(objective, labels, old_pred, new_pred, confidence: float) -> TargetResult:
    t = paired_counts(labels, old_pred, new_pred, labels == objective.target_index)
    min_acc, min_imp = objective.min_accuracy, objective.min_improvement
    if t.n == 0:
        return TargetResult(objective.target_class, t, confidence, None, None, min_acc, min_imp, False, False)
    d_lo, d_hi = stats.drop_interval(t.negative_flips, t.positive_flips, t.n, confidence)
    imp = (-d_hi, -d_lo)
    acc = stats.clopper_pearson_interval(t.new_correct, t.n, confidence)
    # Goals compare in counts where possible so that "exactly at the goal" is met despite float rounding.
    goal_met = (min_acc is None or t.new_correct >= min_acc * t.n - 1e-9) and (
        min_imp is None or t.positive_flips - t.negative_flips >= min_imp * t.n - 1e-9
    )
    with_conf = (min_acc is None or acc[0] >= min_acc) and (min_imp is None or imp[0] >= min_imp)
    return TargetResult(
        objective.target_class, t, confidence, imp, acc, min_acc, min_imp, bool(goal_met), bool(with_conf)
    )


def certify(plan: Plan, labels: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray) -> Certificate:
    """Certify the new model against the old one on the held-out split.

    ``labels``, ``old_pred`` and ``new_pred`` are class indices (into ``plan.classes``) of the same held-out images
    in the same order; images of classes that are neither protected nor the target are ignored. The capabilities
    are judged by the plan's test (``certify.test``: the exact test unless the spec asks for Tango's score test),
    which the certificate's ``statistics`` names.
    """
    labels, old_pred, new_pred = _check_inputs(labels, old_pred, new_pred)
    k = len(plan.classes)
    for name, a in (("labels", labels), ("old_pred", old_pred), ("new_pred", new_pred)):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{name} holds a class index outside [0, {k}) for the plan's {k} classes")
    require = plan.certify.require
    test = plan.certify.test
    caps = tuple(_certify_capability(c, labels, old_pred, new_pred, require, test) for c in plan.constraints)
    target = _certify_target(plan.objective, labels, old_pred, new_pred, float(plan.certify.confidence))
    return Certificate(capabilities=caps, target=target, require=require, statistics=statistics(test))


def certify_budgets(
    plan: Plan, labels: np.ndarray, ancestors: Sequence[tuple[str, np.ndarray]], new_pred: np.ndarray
) -> tuple[CapabilityResult, ...]:
    """The drift budgets: each budgeted capability certified against every ancestor in ``ancestors``
    (``(label, predictions)`` on the same held-out images), with its budget as the tolerance. The budget
    holds only if it holds against every ancestor (an intersection-union test again, so no correction);
    the returned certificate per capability is the one against the ancestor that binds (a failing one
    first, then the largest drop bound), named ``<capability> (budget)``."""
    out = []
    for c in plan.budgeted:
        assert c.budget is not None
        as_budget = dataclasses.replace(c, name=f"{c.name} (budget)", tolerance=float(c.budget))
        results = []
        for label, anc_pred in ancestors:
            lab, old, new = _check_inputs(labels, anc_pred, new_pred)
            r = _certify_capability(as_budget, lab, old, new, plan.certify.require, plan.certify.test)
            results.append(dataclasses.replace(r, against=label))
        if results:
            out.append(
                max(
                    results,
                    key=lambda r: (not r.meets_requirement, -1.0 if r.drop_upper_bound is None else r.drop_upper_bound),
                )
            )
    return tuple(out)
