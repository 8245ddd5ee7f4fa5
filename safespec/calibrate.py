"""The target's decision offset, chosen on validation (``optimize.calibrate``).

Fine-tuning for a target class moves two things at once: the features (what the model can tell apart) and
the target's share of the decision (how readily it says "target"). The second alone is what takes images of
the protected classes that resemble the target: on the demo world a fine-tune whose features kept the
protected classes apart to within 1-2 points of held-out accuracy still lost 5-6 points on horse, all of
them to dog. One scalar, an offset of the target's logit, sets that share after training; it is chosen here
on the validation split, never on the held-out split that certifies, like a checkpoint.

The search is exact. Raising the offset ``b`` flips an image to the target exactly when ``b`` passes its
gap (best other logit minus target logit), so the predictions are constant between consecutive gaps and
only those intervals need scoring. Among the offsets whose validation drop (paired point estimate against
the old model) stays within ``max_drop`` for every capability, the one with the best target accuracy wins;
of equals, the one nearest 0, the least intervention. Within its interval an offset sits at 0 when it can,
else midway between the validation images on either side, never on one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """The chosen offset (logit units at the evaluation temperature) and what it gives on validation."""

    offset: float
    target_accuracy: float
    drops: tuple[float, ...]  # per capability: old accuracy minus new, on its validation images
    feasible: bool  # every drop within max_drop (with offset 0 when none is)


def target_offset(logits: np.ndarray, labels: np.ndarray, old_correct: np.ndarray, target: int,
                  capabilities: Sequence[Sequence[int]], max_drop: float) -> Calibration:
    """The best target offset for one model's validation ``logits`` (N x C; log-probabilities work as well,
    a per-row constant changes no gap). ``old_correct``: the old model's per-image correctness on the same
    images, the reference of each capability's drop."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    old_correct = np.asarray(old_correct, dtype=bool)
    n, c = logits.shape
    if labels.shape != (n,) or old_correct.shape != (n,):
        raise ValueError(f"labels and old_correct must have shape ({n},)")
    if not 0 <= target < c:
        raise ValueError(f"target index {target} out of range for {c} classes")
    if n == 0 or not np.isfinite(logits).all():
        raise ValueError("validation logits must be finite, for at least one image")

    others = logits.copy()
    others[:, target] = -np.inf
    other_pred = others.argmax(1)
    gap = others.max(1) - logits[:, target]  # the image is predicted as the target iff gap < offset
    order = np.argsort(gap, kind="stable")
    g = gap[order]

    # correctness before any image is switched (offset below every gap), then the per-class change as the
    # images switch to the target one by one in gap order
    correct0 = other_pred == labels
    switch = (labels == target).astype(np.int64) - correct0.astype(np.int64)
    delta = np.zeros((n, c), dtype=np.int64)
    delta[np.arange(n), labels[order]] = switch[order]
    base = np.bincount(labels[correct0], minlength=c).astype(np.int64)
    # state k: the first k images (in gap order) predicted as the target, k = 0..n; only the k at which the
    # gap changes are reachable (tied gaps switch together)
    counts = np.vstack([base, base + np.cumsum(delta, axis=0)])  # (n + 1, C)
    ks = np.unique(np.concatenate([[0], np.flatnonzero(np.diff(g) > 0) + 1, [n]]))

    per_class_n = np.bincount(labels, minlength=c)
    old_counts = np.bincount(labels[old_correct], minlength=c)
    caps = [np.asarray(list(k), dtype=np.int64) for k in capabilities]
    cap_n = np.array([per_class_n[k].sum() for k in caps], dtype=np.float64)
    cap_old = np.array([old_counts[k].sum() for k in caps], dtype=np.float64)

    state = counts[ks]  # (S, C)
    cap_new = np.stack([state[:, k].sum(1) for k in caps], axis=1) if caps else np.zeros((len(ks), 0))
    drops = np.where(cap_n > 0, (cap_old - cap_new) / np.maximum(cap_n, 1), 0.0)  # (S, K)
    t_acc = state[:, target] / max(per_class_n[target], 1)
    # the offset of state k: 0 where its interval (g[k-1], g[k]] holds 0, else the interval's midpoint (as far
    # from the validation images on either side as it can be; an unbounded end takes one logit unit)
    lo = np.where(ks > 0, g[np.maximum(ks - 1, 0)], -np.inf)
    hi = np.where(ks < n, g[np.minimum(ks, n - 1)], np.inf)
    with np.errstate(invalid="ignore"):
        mid = np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2, np.where(np.isfinite(lo), lo + 1.0, hi - 1.0))
    offset = np.where((lo < 0) & (0 <= hi), 0.0, mid)

    ok = np.all(drops <= max_drop + 1e-12, axis=1)
    if not ok.any():
        zero = int(np.argmin(np.abs(offset)))
        return Calibration(0.0, float(t_acc[zero]), tuple(map(float, drops[zero])), False)
    cand = np.flatnonzero(ok)
    best = cand[np.lexsort((np.abs(offset[cand]), -t_acc[cand]))[0]]
    return Calibration(float(offset[best]), float(t_acc[best]), tuple(map(float, drops[best])), True)
