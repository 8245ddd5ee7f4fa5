"""The target's decision offset: exact against a brute-force scan, least intervention, never on a gap."""

from __future__ import annotations

import numpy as np
import pytest

from safespec.calibrate import target_offset

T = 1
CAPS = [[0], [2], [3]]


def _problem(seed: int, n: int = 240, c: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.5
    return logits, y, logits.argmax(1) == y


def _apply(logits, labels, old, b):
    shifted = logits.copy()
    shifted[:, T] += b
    correct = shifted.argmax(1) == labels
    drops = [old[np.isin(labels, k)].mean() - correct[np.isin(labels, k)].mean() for k in CAPS]
    return correct[labels == T].mean(), drops


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_drop", [0.0, 0.05, 0.3])
def test_the_offset_is_the_best_feasible_one_of_a_fine_scan(seed, max_drop):
    logits, y, old = _problem(seed)
    cal = target_offset(logits, y, old, T, CAPS, max_drop)
    acc, drops = _apply(logits, y, old, cal.offset)
    assert cal.feasible and max(drops) <= max_drop + 1e-12
    assert acc == pytest.approx(cal.target_accuracy) and np.allclose(drops, cal.drops)
    scan = [_apply(logits, y, old, b) for b in np.linspace(-6, 6, 3001)]
    best = max(a for a, d in scan if max(d) <= max_drop + 1e-12)
    assert cal.target_accuracy == pytest.approx(best)


def test_zero_when_nothing_needs_changing_and_never_on_an_images_gap():
    logits, y, old = _problem(3)
    cal = target_offset(logits, y, old, T, CAPS, 0.0)
    others = logits.copy()
    others[:, T] = -np.inf
    gaps = others.max(1) - logits[:, T]
    assert np.min(np.abs(gaps - cal.offset)) > 1e-6
    # a target that is already perfect and drops nothing: the least intervention is no offset at all
    perfect = np.eye(4)[y] * 5.0
    cal = target_offset(perfect, y, perfect.argmax(1) == y, T, CAPS, 0.0)
    assert cal.offset == 0.0 and cal.target_accuracy == 1.0 and cal.feasible


def test_an_infeasible_model_reports_itself_at_offset_zero():
    """A model that already lost a capability with the target switched off everywhere is infeasible."""
    logits, y, old = _problem(4)
    broken = logits.copy()
    broken[y == 0, 0] -= 10.0  # capability 0 is lost whatever the target's offset
    cal = target_offset(broken, y, old, T, CAPS, 0.02)
    assert not cal.feasible and cal.offset == 0.0


def test_bad_inputs_are_refused():
    logits, y, old = _problem(5)
    with pytest.raises(ValueError, match="shape"):
        target_offset(logits, y[:-1], old, T, CAPS, 0.01)
    with pytest.raises(ValueError, match="target index"):
        target_offset(logits, y, old, 7, CAPS, 0.01)
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        target_offset(bad, y, old, T, CAPS, 0.01)
