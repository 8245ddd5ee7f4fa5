"""certify() on hand-built prediction arrays: every status, pooled capabilities, the verdict, the target, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safespec.certify import certificate as certify_module
from safespec.certify import stats
from safespec.certify import (
    Certificate,
    PairedCounts,
    certify,
    confusion_matrix,
    paired_counts,
    per_class_table,
    status_of,
)
from safespec.plan import compile_spec
from safespec.spec import Spec

CLASSES = ["a", "b", "c", "d", "e", "f", "g"]


def make_plan(protect, target="g", goal=None, require="certified", confidence=0.95, test=None):
    spec = {
        "safespec": 1,
        "name": "t",
        "model": {"arch": "x", "pretrained": "openai"},
        "classes": {"names": CLASSES},
        "data": {"protected": "p.csv", "target": "t.csv", "validation": "v.csv", "heldout": "h.csv"},
        "protect": protect,
        "target": {"class": target, "goal": goal or {"min_improvement": 0.1}},
        "optimize": {
            "batch": {"protected_classes": 1},
            "steps": 100,
            "warmup_steps": 0,
            "eval_every": 50,
            "checkpoint_every": 50,
        },
        "certify": {"require": require, "confidence": confidence, **({"test": test} if test else {})},
    }
    return compile_spec(Spec.model_validate(spec))


def make_arrays(tables: dict[str, tuple[int, int, int, int]], seed=0):
    """Predictions realising, per class, the paired table (both right, old right only, new right only, neither).
    A wrong prediction names another class; images are shuffled so that nothing depends on order."""
    labels, old, new = [], [], []
    k = len(CLASSES)
    for name, (rr, rw, wr, ww) in tables.items():
        y = CLASSES.index(name)
        other = (y + 1) % k
        for o, nw, count in ((y, y, rr), (y, other, rw), (other, y, wr), (other, (y + 2) % k, ww)):
            labels += [y] * count
            old += [o] * count
            new += [nw] * count
    perm = np.random.default_rng(seed).permutation(len(labels))
    return tuple(np.asarray(a, dtype=np.int64)[perm] for a in (labels, old, new))


TABLES = {
    "a": (390, 2, 2, 6),  # certified at 3 points
    "b": (380, 8, 2, 10),  # drop 1.5 points, bound just above 3: preserved
    "c": (360, 20, 2, 18),  # drop 4.5 points: violated
    "d": (50, 0, 0, 0),  # perfect but 50 < 100 images (88 for Tango's test): inconclusive
    "e": (30, 0, 15, 5),  # small, but 15 positive flips certify it anyway
    # "f" has no held-out images at all
    "g": (35, 5, 25, 35),  # target: 40% -> 60%
}


def single(*names, tol=0.03):
    return [{"classes": [n], "tolerance": tol} for n in names]


# ------------------------------------------------------------------------------------------------ helpers
def test_paired_counts_and_confusion_matrix():
    labels, old, new = make_arrays(TABLES)
    t = paired_counts(labels, old, new, labels == CLASSES.index("b"))
    assert (t.both_right, t.negative_flips, t.positive_flips, t.both_wrong) == TABLES["b"]
    assert t.n == 400 and t.old_accuracy == pytest.approx(0.97) and t.new_accuracy == pytest.approx(0.955)
    assert t.accuracy_change == pytest.approx(-0.015) and t.drop == pytest.approx(0.015)
    total = paired_counts(labels, old, new)
    assert total.n == labels.size
    m = confusion_matrix(labels, old, len(CLASSES))
    assert m.sum() == labels.size and int(np.trace(m)) == int(np.sum(labels == old))
    assert m[CLASSES.index("b"), CLASSES.index("b")] == 388
    rows = per_class_table(labels, old, new, CLASSES)
    assert [r["class"] for r in rows] == CLASSES
    assert rows[CLASSES.index("f")]["n"] == 0 and rows[CLASSES.index("f")]["old_accuracy"] is None
    assert rows[CLASSES.index("c")]["negative_flips"] == 20
    with pytest.raises(ValueError):
        confusion_matrix(labels, old, 3)
    with pytest.raises(ValueError):
        paired_counts(labels, old[:-1], new)


# ------------------------------------------------------------------------------------------------- status
def test_every_status_on_hand_built_predictions():
    plan = make_plan(single("a", "b", "c", "d", "e", "f"))
    cert = certify(plan, *make_arrays(TABLES))
    by = {c.name: c for c in cert.capabilities}
    assert {k: v.status for k, v in by.items()} == {
        "a": "certified",
        "b": "preserved",
        "c": "violated",
        "d": "inconclusive",
        "e": "certified",
        "f": "inconclusive",
    }
    # The statuses follow from the exact test's bounds and decisions, recomputed here from the counts.
    assert by["a"].drop_upper_bound == stats.exact_drop_upper_bound(2, 2, 400, 0.95)
    assert by["a"].drop_upper_bound <= 0.03 < by["b"].drop_upper_bound
    assert stats.certifies(2, 2, 400, 0.03, 0.95) and not stats.certifies(8, 2, 400, 0.03, 0.95)
    assert by["e"].table.n < stats.min_informative_n(0.03, 0.95)
    # needed n: None when certified, the unchanged-model minimum for d, more than we have for b, None for c
    # (its observed drop is beyond tolerance: no n certifies it) and for f (nothing observed).
    assert by["a"].needed_n is None and by["e"].needed_n is None
    assert by["d"].needed_n == stats.min_informative_n(0.03, 0.95) == 100
    assert by["b"].needed_n == stats.needed_n(8 / 400, 2 / 400, 0.03, 0.95) and by["b"].needed_n > 400
    # at that size the exact test certifies b's flip rates with at least 80% probability
    assert stats.certification_probability(8 / 400, 2 / 400, by["b"].needed_n, 0.03, 0.95) >= 0.8
    assert by["c"].needed_n is None and by["f"].needed_n is None
    # Clopper-Pearson bounds
    assert by["b"].new_accuracy_lower == pytest.approx(stats.clopper_pearson(382, 400, 0.95, "lower"))
    assert by["b"].flip_rate_upper == pytest.approx(stats.clopper_pearson(8, 400, 0.95, "upper"))
    assert by["f"].table.n == 0 and by["f"].drop_upper_bound is None and by["f"].new_accuracy_lower is None
    assert cert.verdict == "not_certified"


def test_status_boundaries():
    # Exactly at the tolerance in counts (3 of 100 = 0.03) is preserved, one more flip is violated.
    assert status_of(PairedCounts(90, 3, 0, 7), 0.03, 0.95)[0] == "preserved"
    assert status_of(PairedCounts(90, 4, 0, 6), 0.03, 0.95)[0] == "violated"
    # Too few images: inconclusive whatever the point estimate, unless the bound certifies.
    assert status_of(PairedCounts(80, 5, 0, 0), 0.03, 0.95)[0] == "inconclusive"
    assert status_of(PairedCounts(99, 0, 0, 0), 0.03, 0.95)[0] == "inconclusive"
    assert status_of(PairedCounts(100, 0, 0, 0), 0.03, 0.95)[0] == "certified"
    # Tango's score test certifies an unchanged model from 88 images, where the exact test does not
    assert status_of(PairedCounts(87, 0, 0, 0), 0.03, 0.95, "score")[0] == "inconclusive"
    assert status_of(PairedCounts(88, 0, 0, 0), 0.03, 0.95, "score")[0] == "certified"
    assert status_of(PairedCounts(88, 0, 0, 0), 0.03, 0.95)[0] == "inconclusive"
    # Tolerance 0: an unchanged model is preserved, never certified; a significant gain is certified.
    assert status_of(PairedCounts(400, 0, 0, 0), 0.0, 0.95)[0] == "preserved"
    assert status_of(PairedCounts(370, 0, 20, 10), 0.0, 0.95)[0] == "certified"
    assert status_of(PairedCounts(0, 0, 0, 0), 0.03, 0.95) == ("inconclusive", None)


def test_pooled_multiclass_capability_and_per_class_breakdown():
    tables = {"a": (190, 6, 0, 4), "b": (195, 1, 2, 2), "g": (35, 5, 25, 35)}
    plan = make_plan([{"name": "pair", "classes": ["a", "b"], "tolerance": 0.05, "confidence": 0.9}])
    cap = certify(plan, *make_arrays(tables)).capabilities[0]
    assert cap.name == "pair" and cap.classes == ("a", "b") and cap.confidence == 0.9
    t = cap.table
    assert (t.both_right, t.negative_flips, t.positive_flips, t.both_wrong) == (385, 7, 2, 6)
    assert cap.drop_upper_bound == stats.exact_drop_upper_bound(7, 2, 400, 0.9)
    assert cap.status == "certified"
    assert [c.class_name for c in cap.per_class] == ["a", "b"]
    pa, pb = cap.per_class
    assert (pa.table.n, pa.table.negative_flips, pb.table.positive_flips) == (200, 6, 2)
    # Each class is judged at the capability's tolerance and confidence.
    assert pa.drop_upper_bound == stats.exact_drop_upper_bound(6, 0, 200, 0.9)
    assert pa.status == status_of(pa.table, 0.05, 0.9)[0]
    d = cap.to_dict()
    assert [r["class"] for r in d["per_class"]] == ["a", "b"]
    assert set(d["per_class"][0]) == {
        "class",
        "n",
        "old_accuracy",
        "new_accuracy",
        "negative_flips",
        "positive_flips",
        "drop_upper_bound",
        "status",
    }


def test_each_expansion_gives_one_capability_per_class():
    plan = make_plan([{"name": "keep", "classes": ["a", "b"], "each": True, "tolerance": 0.03}])
    cert = certify(plan, *make_arrays(TABLES))
    assert [c.name for c in cert.capabilities] == ["keep/a", "keep/b"]
    assert [c.status for c in cert.capabilities] == ["certified", "preserved"]


# ------------------------------------------------------------------------------------------------ verdict
def test_verdict_is_the_intersection_of_capabilities():
    arrays = make_arrays(TABLES)
    assert certify(make_plan(single("a", "e")), *arrays).verdict == "certified"
    assert certify(make_plan(single("a", "b")), *arrays).verdict == "not_certified"
    # require: preserved lets a preserved capability through, but not a violated or inconclusive one.
    ok = certify(make_plan(single("a", "b"), require="preserved"), *arrays)
    assert ok.verdict == "certified" and [c.meets_requirement for c in ok.capabilities] == [True, True]
    for bad in ("c", "d", "f"):
        cert = certify(make_plan(single("a", "b", bad), require="preserved"), *arrays)
        assert cert.verdict == "not_certified"
        assert [c.meets_requirement for c in cert.capabilities] == [True, True, False]
    # The verdict is derived from the capabilities, not stored.
    cert = certify(make_plan(single("a", "b")), *arrays)
    assert cert.to_dict()["verdict"] == cert.verdict == "not_certified"
    with pytest.raises(Exception):
        cert.verdict = "certified"  # type: ignore[misc]


def test_certificate_depends_only_on_the_predictions_not_their_order():
    plan = make_plan(single("a", "b", "c"))
    one = certify(plan, *make_arrays(TABLES, seed=1)).to_dict()
    two = certify(plan, *make_arrays(TABLES, seed=2)).to_dict()
    assert one == two


def test_rejects_bad_arrays():
    plan = make_plan(single("a"))
    labels, old, new = make_arrays(TABLES)
    with pytest.raises(ValueError):
        certify(plan, labels, old, new[:-1])
    bad = new.copy()
    bad[0] = len(CLASSES)
    with pytest.raises(ValueError):
        certify(plan, labels, old, bad)


# ------------------------------------------------------------------------------------------------- target
def test_target_improvement_intervals_and_goals():
    arrays = make_arrays(TABLES)
    cert = certify(make_plan(single("a"), goal={"min_improvement": 0.05}), *arrays)
    t = cert.target
    assert t.class_name == "g" and t.table.n == 100
    d = t.to_dict()
    assert d["old_accuracy"] == pytest.approx(0.4) and d["new_accuracy"] == pytest.approx(0.6)
    assert d["improvement"] == pytest.approx(0.2)
    lo, hi = stats.drop_interval(5, 25, 100, 0.95)
    assert d["improvement_interval"] == pytest.approx([-hi, -lo])
    assert d["improvement_interval"][0] < 0.2 < d["improvement_interval"][1]
    assert d["new_accuracy_interval"] == pytest.approx(list(stats.clopper_pearson_interval(60, 100, 0.95)))
    assert d["goal"] == {"min_accuracy": None, "min_improvement": 0.05}
    assert d["goal_met"] is True and d["goal_met_with_confidence"] is True  # the interval starts near 0.0996
    assert cert.success is True

    strict = certify(make_plan(single("a"), goal={"min_improvement": 0.1}), *arrays).target
    assert strict.goal_met and not strict.goal_met_with_confidence
    acc = certify(make_plan(single("a"), goal={"min_accuracy": 0.7}), *arrays)
    assert not acc.target.goal_met and not acc.success and acc.verdict == "certified"
    both = certify(make_plan(single("a"), goal={"min_accuracy": 0.6, "min_improvement": 0.2}), *arrays).target
    assert both.goal_met  # exactly at both goals
    # No held-out image of the target: nothing is met.
    empty = certify(make_plan(single("a"), target="f"), *arrays).target.to_dict()
    assert empty["n"] == 0 and empty["goal_met"] is False and empty["improvement_interval"] is None


def test_success_needs_both_safety_and_goal():
    arrays = make_arrays(TABLES)
    assert not certify(make_plan(single("c")), *arrays).success  # goal met, but violated
    assert certify(make_plan(single("a")), *arrays).success


# ------------------------------------------------------------------------------------------------- JSON
CAPABILITY_KEYS = {
    "name",
    "classes",
    "status",
    "meets_requirement",
    "tolerance",
    "confidence",
    "n",
    "old_accuracy",
    "new_accuracy",
    "accuracy_change",
    "drop_upper_bound",
    "new_accuracy_lower",
    "flip_rate_upper",
    "negative_flips",
    "positive_flips",
    "both_right",
    "both_wrong",
    "needed_n",
    "per_class",
}


def _walk(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from _walk(v)
    else:
        yield x


def test_to_dict_is_plain_json_with_the_documented_fields():
    cert = certify(make_plan(single("a", "b", "c", "d", "e", "f")), *make_arrays(TABLES))
    d = cert.to_dict()
    assert set(d) == {"verdict", "require", "capabilities", "target", "statistics"}
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    for cap in d["capabilities"]:
        assert set(cap) == CAPABILITY_KEYS
    for leaf in _walk(d):
        assert leaf is None or type(leaf) in (str, bool, int, float), type(leaf)
    assert d["statistics"]["test"] == "exact" and d["statistics"]["drop_bound"].startswith("exact unconditional")
    assert d["capabilities"][5]["old_accuracy"] is None  # n = 0 gives None, never NaN
    assert isinstance(cert, Certificate)


def test_the_spec_chooses_the_test_and_the_certificate_names_it():
    arrays = make_arrays(TABLES)
    names = ("a", "b", "c", "d", "e", "f")
    exact = certify(make_plan(single(*names)), *arrays)
    score = certify(make_plan(single(*names), test="score"), *arrays)
    assert make_plan(single("a")).certify.test == "exact"
    assert make_plan(single("a"), test="score").certify.test == "score"
    assert exact.to_dict()["statistics"] == certify_module.statistics("exact")
    assert score.to_dict()["statistics"]["test"] == "score"
    assert score.to_dict()["statistics"]["drop_bound"] == "Tango score (one-sided)"
    for e, s in zip(exact.capabilities, score.capabilities):
        t = e.table
        if t.n == 0:
            continue
        assert s.drop_upper_bound == stats.drop_upper_bound(t.negative_flips, t.positive_flips, t.n, 0.95)
        assert e.drop_upper_bound == stats.exact_drop_upper_bound(t.negative_flips, t.positive_flips, t.n, 0.95)
        assert s.needed_n == (
            None
            if s.needed_n is None
            else stats.needed_n(t.negative_flips / t.n, t.positive_flips / t.n, 0.03, 0.95, test="score")
        )
    # "d" (50 unchanged images) is inconclusive by both: 88 images are Tango's minimum, 100 the exact test's
    d_exact, d_score = exact.capabilities[3], score.capabilities[3]
    assert d_exact.status == d_score.status == "inconclusive" and (d_exact.needed_n, d_score.needed_n) == (100, 88)
    with pytest.raises(ValueError):
        certify_module.statistics("wald")


def test_one_paired_count_serves_the_certificate_and_selection():
    """paired_from_correct is where flips are counted; paired_counts is it over predictions."""
    from safespec.certify import paired_counts, paired_from_correct

    labels = np.array([0, 0, 1, 1, 2, 2])
    old = np.array([0, 1, 1, 0, 2, 0])
    new = np.array([1, 1, 1, 1, 2, 2])
    t = paired_from_correct(old == labels, new == labels)
    assert (t.both_right, t.negative_flips, t.positive_flips, t.both_wrong) == (2, 1, 2, 1)
    assert paired_counts(labels, old, new) == t
    with pytest.raises(ValueError, match="shape"):
        paired_from_correct(np.ones(3, bool), np.ones(4, bool))
