"""Selection by the predicted certificate: no one-image cliffs, the same choice at any validation size when
the evidence is clear, refusal of candidates whose paired evidence predicts a violation, and the best
admissible target offset."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from safespec.certify.selection import Capability, Selector, bandwidth, margins

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rivals import rival_logits  # noqa: E402

T = 1  # the target class
C = 4


def _caps(heldout_n=400, tolerance=0.03):
    return [Capability(name, (k,), tolerance, 0.95, heldout_n) for name, k in (("a", 0), ("c", 2), ("d", 3))]


def _old(n_per_class=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per_class)
    logits = rng.normal(size=(len(y), C))
    logits[np.arange(len(y)), y] += 2.5
    return logits, y


def _flip(logits, y, cls, count):
    """The new model gets ``count`` images of ``cls`` wrong that the old one had right (pushed to class 0 or 2)."""
    new = logits.copy()
    right = np.flatnonzero((y == cls) & (logits.argmax(1) == y))[:count]
    other = 2 if cls == 0 else 0
    new[right, other] = new[right, cls] + 1.0
    return new


def test_the_old_model_has_no_drop_and_is_admissible():
    old, y = _old()
    sel = Selector(old, y, _caps(), T, 0.8)
    a = sel.assess(old, calibrate=False)
    assert a.admissible and a.offset == 0.0
    assert all(e.drop == 0.0 and e.drop_se == 0.0 and e.flips == (0, 0) for e in a.evidence)
    assert a.probability == pytest.approx(1.0)


def test_too_few_heldout_images_make_even_the_old_model_inadmissible():
    """At 50 held-out images a 3-point tolerance cannot be certified even for an unchanged model."""
    old, y = _old()
    assert not Selector(old, y, _caps(heldout_n=50), T, 0.8).assess(old, calibrate=False).admissible


def test_a_candidate_whose_paired_evidence_predicts_a_violation_is_refused():
    old, y = _old()
    sel = Selector(old, y, _caps(), T, 0.8)
    bad = _flip(old, y, 0, 6)  # 6 of 60 (10 points) lost on capability 'a'
    a = sel.assess(bad, calibrate=False)
    assert not a.admissible
    blocking = a.blocking()
    assert blocking.name == "a" and blocking.flips[0] == 6 and blocking.probability < 0.05
    assert blocking.predicted_bound > 0.03
    assert "no amount of validation data" in blocking.needed(0.8)


@pytest.mark.parametrize("flips, admissible", [(0, True), (8, False)])
def test_the_same_choice_with_the_validation_set_duplicated_four_times(flips, admissible):
    """Clear evidence (no change, or 8 of 60 images lost) gives the same decision at 4x the validation size:
    the rule weighs how much evidence there is, it does not count flips."""
    old, y = _old()
    new = _flip(old, y, 2, flips)
    one = Selector(old, y, _caps(), T, 0.8).assess(new, calibrate=True)
    four = Selector(np.tile(old, (4, 1)), np.tile(y, 4), _caps(), T, 0.8).assess(np.tile(new, (4, 1)), calibrate=True)
    assert one.admissible == four.admissible == admissible
    assert one.target_accuracy == pytest.approx(four.target_accuracy)
    if not admissible:  # more of the same evidence makes the refusal more certain, not less
        assert four.probability <= one.probability


def test_one_image_crossing_its_boundary_is_no_cliff():
    """Moving one image from just right to just wrong changes the predicted probability by as little as the
    move is small, where a flip count jumps by 1.7 points of a 60-image class whatever the move."""
    old, y = _old()
    sel = Selector(old, y, _caps(), T, 0.8)
    i = int(np.flatnonzero((y == 0) & (old.argmax(1) == 0))[0])
    before, after = old.copy(), old.copy()
    best_other = np.max(np.delete(old[i], 0))
    jumps = []
    for step in (1e-2, 1e-3):
        before[i, 0] = best_other + step
        after[i, 0] = best_other - step
        pb, pa = (sel.assess(m, calibrate=False).probability for m in (before, after))
        jumps.append(pb - pa)
    assert 0 < jumps[1] < jumps[0] / 5 and jumps[1] < 0.005


def test_fewer_heldout_images_lower_the_probability():
    old, y = _old()
    new = _flip(old, y, 0, 1)
    probs = [
        Selector(old, y, _caps(heldout_n=m), T, 0.8).assess(new, calibrate=False).probability for m in (200, 400, 2000)
    ]
    assert probs[0] < probs[1] < probs[2]


def test_the_chosen_offset_is_the_best_admissible_one_of_a_fine_scan():
    old, y = _old(seed=3)
    old[y == T, T] -= 2.5  # the old model is weak on the target
    new = old.copy()
    new[y == T, T] += 1.0  # the candidate learned something about it
    sel = Selector(old, y, _caps(), T, 0.8)
    a = sel.assess(new, calibrate=True)
    assert a.admissible and a.offset != 0.0
    assert sel.probability(new, a.offset) >= 0.8
    assert a.target_accuracy == pytest.approx(sel.target_accuracy(new, a.offset))
    # a scan of offsets: nothing admissible gets more of the target right, except within a hair of a
    # validation image's gap (the chosen offset keeps its distance from them)
    gaps = -margins(new[y == T], y[y == T], T)
    scan = [b for b in np.linspace(-4, 4, 1601) if np.min(np.abs(gaps - b)) > 0.02]
    best = max(sel.target_accuracy(new, b) for b in scan if sel.probability(new, b) >= 0.8)
    assert a.target_accuracy >= best
    # and the offset is what bought it: at 0 the target is worse
    assert sel.target_accuracy(new, 0.0) < a.target_accuracy


def test_the_offset_is_zero_when_that_is_in_reach_and_never_on_a_target_gap():
    old, y = _old(seed=5)
    sel = Selector(old, y, _caps(), T, 0.8)
    a = sel.assess(old, calibrate=True)
    gaps = -margins(old[y == T], y[y == T], T)
    assert a.offset == 0.0 or np.min(np.abs(gaps - a.offset)) > 1e-6
    assert sel.target_accuracy(old, a.offset) == a.target_accuracy


def test_bandwidth_narrows_with_more_images_and_is_never_zero():
    rng = np.random.default_rng(0)
    m = rng.normal(3.0, 1.0, 4000)
    assert bandwidth(m[:50]) > bandwidth(m) > 0
    assert bandwidth(np.full(10, 2.0)) > 0 and bandwidth(np.array([1.5])) > 0


def test_bad_inputs_are_refused():
    old, y = _old()
    with pytest.raises(ValueError, match="min_probability"):
        Selector(old, y, _caps(), T, 1.0)
    sel = Selector(old, y, _caps(), T, 0.8)
    with pytest.raises(ValueError, match="finite"):
        sel.assess(np.full_like(old, np.nan), calibrate=False)


# ------------------------------------------------------------------------------------------ the test's own margin
def _evidence(test, heldout_n, drop, n=4000):
    """A capability whose validation images each moved by ``drop`` (terms all equal: no validation noise)."""
    from safespec.certify.selection import _predict

    cap = Capability("a", (0,), 0.03, 0.95, heldout_n, test)
    return _predict(cap, np.full(n, drop), (int(drop * n), 0))


def test_the_exact_certificate_is_predicted_by_its_own_acceptance_region():
    from safespec.certify.stats import certifies

    for m in (200, 400):
        e = _evidence("exact", m, 0.0)
        allowed = e.tolerance - e.margin_of_error  # the predicted largest passing drop, in flips: B + 1/2
        b = int(round(allowed * m - 0.5))
        assert certifies(b, 0, m, 0.03, 0.95, "exact") and not certifies(b + 1, 0, m, 0.03, 0.95, "exact")


def test_at_200_held_out_images_the_exact_prediction_is_stricter_than_the_score_tests():
    # 0.9% drop: 1.8 expected negative flips of 200. Tango's test would certify 2, the exact test only 1
    exact, score = _evidence("exact", 200, 0.009), _evidence("score", 200, 0.009)
    assert exact.probability < 0.5 < score.probability
    # at 400 both tests accept the same flips, and the predictions agree to within one image
    e4, s4 = _evidence("exact", 400, 0.009), _evidence("score", 400, 0.009)
    assert abs(e4.margin_of_error - s4.margin_of_error) <= 1 / 400
    assert e4.probability > 0.5 and s4.probability > 0.5


def test_equal_target_accuracy_is_broken_by_the_smoothed_target_accuracy():
    """Two candidates that get the same target images right: the one whose target images sit further on
    the right side of the boundary scores higher (what checkpoint selection breaks ties by)."""
    from safespec.train.candidates import Candidates

    old, y = _old()
    sel = Selector(old, y, _caps(), T, 0.8)
    t = y == T
    near, far = old.copy(), old.copy()
    right = t & (old.argmax(1) == y)
    near[right, T] -= 0.5 * (margins(old, y)[right])  # still right, half the margin
    far[right, T] += 1.0
    a_near, a_far = sel.assess(near, calibrate=False), sel.assess(far, calibrate=False)
    assert a_near.target_accuracy == a_far.target_accuracy
    assert a_far.target_smooth > sel.target_smooth(old) > a_near.target_smooth

    c = Candidates(0.8)
    keep = lambda: {}  # noqa: E731
    for step, a in ((50, a_near), (100, a_far), (150, a_near)):
        v = {"score": a.target_accuracy, "smooth": a.target_smooth, "offset": 0.0, "assessment": a}
        c.consider(step, v, eligible=True, weights=keep, with_offset=lambda s, o, r=None: s)
    assert c.best_step == 100  # neither the earliest of the tied nor the latest: the best-separated one
    restored = Candidates(0.8)
    restored.load_state_dict(c.state_dict(), c.best_state)
    assert (restored.best_step, restored.best_smooth) == (100, c.best_smooth)


def test_an_offset_per_rival_rescues_the_targets_a_single_offset_cannot():
    from safespec.certify.selection import rival_offsets

    z, y = rival_logits(100, 20)
    caps = [Capability(str(c), (c,), 0.03, 0.95, 400) for c in (0, 1)]
    sel = Selector(z, y, caps, 2, 0.8)
    one = sel.assess(z, calibrate=True)
    assert one.rival_offsets is None and one.target_accuracy == 0.0  # held back by class 1
    per = sel.assess(z, calibrate=True, rivals=True)
    o = np.array(per.rival_offsets)
    assert o[0] > 0.5 and o[1] < 0.3 and per.admissible and per.target_accuracy == 0.5
    start = one.offset if one.admissible else 0.0
    floors = sel.rival_floors(z, start, o)
    assert per.probability == pytest.approx(sel.probability(rival_offsets(z, 2, o), 0.0, floors))
    assert per.probability <= sel.probability(rival_offsets(z, 2, o)) + 1e-12  # the tail only adds risk
    moved = rival_offsets(z, 2, o)
    np.testing.assert_array_equal(moved[:, :2], z[:, :2])  # no other class moves
    # without calibration there is nothing to grow
    assert sel.assess(z, calibrate=False, rivals=True).rival_offsets is None
    z4, y4 = np.tile(z, (4, 1)), np.tile(y, 4)  # the same images four times: the same choice
    per4 = Selector(z4, y4, caps, 2, 0.8).assess(z4, calibrate=True, rivals=True)
    assert per4.target_accuracy == 0.5 and per4.admissible


def test_the_exchangeable_tail_counts_gaps_passed_over_n_plus_one_and_interpolates_between():
    from safespec.certify.selection import exchangeable_tail

    g = np.array([-1.0, 1.0, 2.0, 4.0])  # one gap below the start: the kernel's business, not the tail's
    assert exchangeable_tail(g, 0.0, 0.0, 9) == 0.0 and exchangeable_tail(g, 0.0, -3.0, 9) == 0.0
    assert exchangeable_tail(g, 0.0, 0.5, 9) == pytest.approx(0.5 / 10)  # halfway to the first gap
    assert exchangeable_tail(g, 0.0, 1.0, 9) == pytest.approx(1 / 10)  # past one of 9: 1 / (n + 1)
    assert exchangeable_tail(g, 0.0, 3.0, 9) == pytest.approx(2.5 / 10)
    assert exchangeable_tail(g, 0.0, 9.0, 9) == pytest.approx(3 / 10)  # past every gap: their count
    # continuous in the offset: no one-image cliff where it passes a gap
    for x in (1.0, 2.0, 4.0):
        assert exchangeable_tail(g, 0.0, x - 1e-9, 9) == pytest.approx(exchangeable_tail(g, 0.0, x + 1e-9, 9))


def test_a_rival_whose_validation_images_sit_far_off_is_not_grown_on_absence_of_evidence():
    """Class 0's validation images all sit about 5 below the target, so the kernel sees no risk in raising
    the target against class 0 past its competing target images (offset 1.5). By exchangeability one held-out
    image in 61 still falls below the nearest of 60 validation gaps, and that share is as uncertain as it is
    large: at 200 held-out images (one net flip certifiable) it is too much to grow on, at 400 it is not,
    and more validation images make the growth surer."""
    from safespec.certify.selection import rival_offsets

    def grow(n: int, heldout: int):
        z, y = rival_logits(n, 5)
        caps = [Capability(str(c), (c,), 0.03, 0.95, heldout) for c in (0, 1)]
        sel = Selector(z, y, caps, 2, 0.8)
        return sel, z, sel.assess(z, calibrate=True, rivals=True)

    sel, z, a = grow(60, 200)
    far = np.array([1.5, 0.0, 0.0])
    assert sel.probability(rival_offsets(z, 2, far)) > 0.99  # the kernel alone: free
    assert sel.probability(rival_offsets(z, 2, far), 0.0, sel.rival_floors(z, 0.0, far)) < 0.8
    assert a.rival_offsets[0] == 0.0 and a.target_accuracy == 0.0 and a.admissible
    grown = [grow(n, 400)[2] for n in (60, 100)]
    for a in grown:
        assert a.rival_offsets[0] > 1.0 and a.target_accuracy == 0.5 and a.admissible
    assert grown[0].probability < grown[1].probability < 1.0
