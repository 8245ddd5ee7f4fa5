"""Checkpoint and target-offset selection by the predicted outcome of the held-out certificate.

Selection sees the validation split only, but what it must anticipate is the certificate on the held-out
split. An earlier rule required each capability's validation drop (a paired point estimate) to stay within
a fixed ``max_drop``: with 60 validation images per class one flipped image is 1.7 points, so that rule was
a flip count in disguise, and it meant something different at every validation size (docs/selection.md).

This rule weighs evidence in proportion to how much there is:

1. **A smooth drop.** Each validation image of a capability contributes how much more likely an image like
   it is to be misclassified by the new model than by the old one, with its margin (true-class logit
   minus the best other) seen through a Gaussian kernel: ``t_i = Phi(-m_new,i / s) - Phi(-m_old,i / s)``. Its
   mean is a kernel-smoothed accuracy drop: an image that moved to the brink of a flip counts partly, one
   that crossed by a hair does not count fully, and a model identical to the old one scores exactly 0. The
   bandwidth ``s`` is Silverman's rule on the old model's margins of the capability, so it narrows as
   validation grows (the estimate tends to the plain paired drop) and is the same for every candidate.
2. **A predicted certificate.** The held-out certificate passes when the held-out drop estimate stays below
   the tolerance minus the certificate's own margin of error at the held-out size ``m``. For the exact test
   (the default) that margin is read off the test's own acceptance region: at ``c`` positive flips it
   certifies at most ``B(c)`` negative ones, so the drop must stay below ``(B(c) + 1/2 - c) / m`` (a
   continuity correction; ``c`` the expected positive flips, ``B`` interpolated). For Tango's score test it
   is ``z * sqrt(w0 / m)`` (``w0`` the variance of the paired test under its null). The two agree at 400
   held-out images per class; at 200 the exact test accepts one negative flip fewer, which a prediction
   from the score test would miss. The validation estimate
   is uncertain (standard error from the per-image terms over ``n`` validation images) and so is the held-out
   draw (the flip rates' variance over ``m``), so the probability of passing is
   ``P = Phi((tol - z sqrt(w0 / m) - d) / sqrt(var_i(t) / n + w1 / m))``. Duplicating the validation set
   shrinks the first variance and pushes ``P`` toward 0 or 1, but does not move the point at which ``P``
   crosses one half: clear evidence gives the same decision at any validation size.
3. **The rule.** A candidate (checkpoint, target offset) is admissible when the probability that every
   capability passes, the product of the ``P``s, is at least ``min_certify_probability``. Among admissible
   candidates the best validation target accuracy wins; of equal accuracies (a count over 50 or 60 images
   ties often), the best kernel-smoothed target accuracy (the target's margins through the same kind of
   kernel) does, not the earliest checkpoint. The old model itself has no flips and is admissible
   whenever the held-out split could certify an unchanged model at all.
4. **What validation cannot show.** Offsets grown per rival class (``target_offset: per-rival``) are
   also judged by exchangeability alone: past the j-th smallest of a rival's n validation gaps lie about
   j / (n + 1) of its held-out images, whatever the kernel says of the empty space before them
   (``exchangeable_tail``, ``Selector.rival_floors``).

Numpy and scipy only: selection is a pure function of the two models' validation logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .certificate import paired_from_correct
from .stats import DEFAULT_TEST, exact_region, restricted_mle, z_value

#: Candidates' target offsets are searched to this resolution (logit units at the evaluation temperature).
OFFSET_RESOLUTION = 1e-4
#: The exact test's acceptance region is computed up to this many positive flips; beyond, the score test's
#: margin of error stands in (both tests agree there to within a flip).
EXACT_REGION_C_MAX = 200


@functools.lru_cache(maxsize=64)
def _exact_acceptance(m: int, tolerance: float, confidence: float) -> np.ndarray:
    """B[c]: the most negative flips the exact certificate accepts with c positive flips, at held-out size
    m (-1: none). Computed once per (m, tolerance, confidence) in a process (under a second at m = 400)."""
    return exact_region(m, tolerance, confidence, c_max=min(m, EXACT_REGION_C_MAX)).astype(np.float64)


# ------------------------------------------------------------------------------------------ margins
def margins(logits: np.ndarray, labels: np.ndarray, target: int | None = None, offset: float = 0.0) -> np.ndarray:
    """True-class logit minus the best other logit of each row, with ``offset`` added to the target's logit."""
    z = np.asarray(logits, dtype=np.float64)
    if target is not None and offset:
        z = z.copy()
        z[:, target] += offset
    rows = np.arange(len(z))
    true = z[rows, labels]
    other = z.copy()
    other[rows, labels] = -np.inf
    return true - other.max(1)


def rival_offsets(logits: np.ndarray, target: int, offsets: np.ndarray) -> np.ndarray:
    """``logits`` with the target's logit raised by ``offsets[k]``, k each row's strongest rival (its best
    non-target class): a target threshold that depends on the class the target competes with. The other
    classes' logits never move, so under ``model.target_tower`` a protected class's flips depend on the
    offset against it alone, and one protected class close to the target no longer holds every other
    back (docs/selection.md)."""
    z = np.array(logits, dtype=np.float64)
    rest = z.copy()
    rest[:, target] = -np.inf
    z[:, target] += np.asarray(offsets, dtype=np.float64)[rest.argmax(1)]
    return z


def exchangeable_tail(gaps: np.ndarray, start: float, offset: float, n: int) -> float:
    """The expected share of a class's held-out images whose gap (own logit minus the target's) lies in
    ``[start, offset)``, from its ``n`` validation images' sorted ``gaps``. Held-out and validation images
    are exchangeable, so a held-out image falls below the j-th smallest validation gap above ``start``
    with probability j / (n + 1) (whatever the gaps' distribution, and also when ``offset`` was chosen
    by looking at these gaps); between consecutive gaps the share is interpolated linearly, and it is 0 at
    ``start`` itself. Past the last gap it stays at the count of gaps passed."""
    if offset <= start or n <= 0:
        return 0.0
    above = np.asarray(gaps, dtype=np.float64)
    above = above[above >= start]
    pts = np.concatenate([[start], above])
    j = int(np.searchsorted(pts, offset, side="right")) - 1  # pts[j] <= offset < pts[j + 1]
    if j >= len(pts) - 1:
        return len(above) / (n + 1)
    lo, hi = pts[j], pts[j + 1]
    return (j + ((offset - lo) / (hi - lo) if hi > lo else 0.0)) / (n + 1)


def bandwidth(old_margins: np.ndarray) -> float:
    """Silverman's rule of thumb for a Gaussian kernel on one capability's old-model margins. A capability
    whose margins are all equal (or a single image) gets a bandwidth from their scale, never 0."""
    m = np.asarray(old_margins, dtype=np.float64)
    n = len(m)
    if n == 0:
        return 1.0
    sd = float(m.std(ddof=1)) if n > 1 else 0.0
    q75, q25 = np.percentile(m, [75, 25])
    spread = min(sd, (q75 - q25) / 1.349) if q75 > q25 else sd
    if spread <= 0:
        spread = max(float(np.abs(m).mean()), 1.0)
    return 0.9 * spread * n ** (-0.2)


# ------------------------------------------------------------------------------------------ evidence
@dataclass(frozen=True)
class Evidence:
    """What validation says about one capability's coming held-out certificate."""

    name: str
    n: int  # validation images
    heldout_n: int  # held-out images the certificate will have
    tolerance: float
    drop: float  # smooth drop (see module docstring)
    drop_se: float  # its standard error over the validation images
    flips: tuple[int, int]  # plain paired counts (negative, positive), for the record
    margin_of_error: float  # z * sqrt(w0 / m): what the certificate will subtract from the tolerance
    heldout_sd: float  # sqrt(w1 / m): the held-out draw's own spread
    probability: float  # of the capability being certified

    @property
    def predicted_bound(self) -> float:
        """The drop bound the certificate would report if held-out looked like validation."""
        return self.drop + self.margin_of_error

    def needed(self, min_probability: float) -> str:
        """What evidence would have let this capability pass at ``min_probability``, in words."""
        q = norm.ppf(min(max(min_probability, 1e-9), 1 - 1e-9))
        room = self.tolerance - self.margin_of_error - self.drop
        sd = math.hypot(self.drop_se, self.heldout_sd)
        limit = self.tolerance - self.margin_of_error - q * sd
        if room <= 0:
            return (
                f"a smooth validation drop of at most {limit:+.2%} (it is {self.drop:+.2%}); at this drop "
                f"no amount of validation data would do: it leaves no room under the tolerance once the "
                f"certificate's margin of error at {self.heldout_n} held-out images ({self.margin_of_error:.2%}) "
                f"is taken"
            )
        per_image = self.drop_se**2 * self.n
        spare = (room / q) ** 2 - self.heldout_sd**2 if q > 0 else math.inf
        more = (
            f"or about {math.ceil(per_image / spare):,} validation images at the same drop"
            if spare > 0 and per_image > 0
            else "(more validation images alone would not do)"
        )
        return f"a smooth validation drop of at most {limit:+.2%} (it is {self.drop:+.2%}), {more}"

    def to_dict(self) -> dict:
        return {
            "capability": self.name,
            "validation_n": self.n,
            "heldout_n": self.heldout_n,
            "smooth_drop": self.drop,
            "drop_se": self.drop_se,
            "negative_flips": self.flips[0],
            "positive_flips": self.flips[1],
            "predicted_bound": self.predicted_bound,
            "certify_probability": self.probability,
        }


@dataclass(frozen=True)
class Capability:
    """A capability as selection sees it: its classes, tolerance, confidence and held-out size."""

    name: str
    class_indices: tuple[int, ...]
    tolerance: float
    confidence: float
    heldout_n: int
    test: str = DEFAULT_TEST  # the certificate's test (certify.test): its margin of error is predicted


#: What ``Selector.rival_floors`` reads of one candidate: each capability's smooth drop at the growth's start,
#: and per class of it (class index, validation images, sorted gaps of the images the target would take).
_Tails = tuple[list[float], list[list[tuple[int, int, np.ndarray]]]]


@dataclass(frozen=True)
class Floor:
    """A smooth drop a capability is predicted at least at, and that estimate's variance
    (``Selector.rival_floors``)."""

    drop: float
    var: float


def _predict(cap: Capability, t: np.ndarray, flips: tuple[int, int], floor: Floor | None = None) -> Evidence:
    n, m, tol = len(t), max(int(cap.heldout_n), 0), cap.tolerance
    if n == 0 or m == 0:  # nothing to go by: selection cannot vouch for it, and says so
        return Evidence(cap.name, n, m, tol, 0.0, 0.0, flips, 1.0, 0.0, 0.0 if m == 0 else 0.5)
    d = float(t.mean())
    se = float(t.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    pb, pc = float(np.clip(t, 0, None).mean()), float(np.clip(-t, 0, None).mean())
    if floor is not None:  # losses the kernel cannot see (Selector.rival_floors): counted as negative flips
        se = math.sqrt(se * se + floor.var)  # a share estimated from n images is uncertain too
        if floor.drop > d:
            pb, d = pb + (floor.drop - d), floor.drop
    moe = _margin_of_error(cap, m, pb, pc)
    hsd = math.sqrt(max(pb + pc - d * d, 0.0) / m)
    sd = math.hypot(se, hsd)
    room = tol - moe - d
    prob = float(norm.cdf(room / sd)) if sd > 0 else float(room >= 0)
    return Evidence(cap.name, n, m, tol, d, se, flips, moe, hsd, prob)


def _margin_of_error(cap: Capability, m: int, pb: float, pc: float) -> float:
    """How far below the tolerance the held-out drop must stay for the certificate to pass."""
    tol = cap.tolerance
    if cap.test == "exact":
        region = _exact_acceptance(m, tol, cap.confidence)
        c_hat = m * pc
        if c_hat <= len(region) - 1:
            allowed = float(np.interp(c_hat, np.arange(len(region)), region))
            return tol - (allowed + 0.5 - c_hat) / m
    p0 = float(restricted_mle(m * pb, m * pc, m, tol))  # the null's positive-flip rate at the margin
    w0 = 2.0 * p0 + tol * (1.0 - tol)
    return z_value(cap.confidence) * math.sqrt(w0 / m)


class Selector:
    """Scores candidates against the old model's validation logits (fixed for a whole run)."""

    def __init__(
        self,
        old_logits: np.ndarray,
        labels: np.ndarray,
        capabilities: Sequence[Capability],
        target: int,
        min_probability: float,
    ):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.old = np.asarray(old_logits, dtype=np.float64)
        if self.old.ndim != 2 or self.old.shape[0] != len(self.labels):
            raise ValueError("old_logits must be N x C for the N validation labels")
        if not np.isfinite(self.old).all():
            raise ValueError("validation logits must be finite")
        if not 0.5 <= min_probability < 1.0:  # below one half admissibility would not be monotone in the offset
            raise ValueError(f"min_probability must lie in [0.5, 1), got {min_probability!r}")
        self.caps = list(capabilities)
        self.target, self.q = target, float(min_probability)
        self.masks = [np.isin(self.labels, c.class_indices) for c in self.caps]
        old_m = margins(self.old, self.labels)
        self.old_margins = [old_m[mk] for mk in self.masks]
        self.bandwidths = [bandwidth(om) for om in self.old_margins]
        self.old_terms = [norm.cdf(-om / s) for om, s in zip(self.old_margins, self.bandwidths)]
        self.old_correct = old_m > 0
        self.target_mask = self.labels == target
        # the target's margins seen through the same kind of kernel: the tie-break between candidates of
        # equal target accuracy (a count over few images ties often)
        self.target_bandwidth = bandwidth(old_m[self.target_mask]) if self.target_mask.any() else 1.0

    def evidence(
        self, logits: np.ndarray, offset: float = 0.0, floors: Sequence[Floor | None] | None = None
    ) -> list[Evidence]:
        """Each capability's evidence at ``offset``; ``floors`` (one per capability) are smooth drops it is
        predicted at least at (``rival_floors``)."""
        m = margins(logits, self.labels, self.target, offset)
        out = []
        for i, (cap, mk, s, old_t) in enumerate(zip(self.caps, self.masks, self.bandwidths, self.old_terms)):
            t = norm.cdf(-m[mk] / s) - old_t
            pc = paired_from_correct(self.old_correct[mk], m[mk] > 0)
            out.append(_predict(cap, t, (pc.negative_flips, pc.positive_flips), None if floors is None else floors[i]))
        return out

    def probability(
        self, logits: np.ndarray, offset: float = 0.0, floors: Sequence[Floor | None] | None = None
    ) -> float:
        return float(np.prod([e.probability for e in self.evidence(logits, offset, floors)]))

    def target_accuracy(self, logits: np.ndarray, offset: float = 0.0) -> float:
        if not self.target_mask.any():
            return float("nan")
        return float((margins(logits[self.target_mask], self.labels[self.target_mask], self.target, offset) > 0).mean())

    def target_smooth(self, logits: np.ndarray, offset: float = 0.0) -> float:
        """The kernel-smoothed target accuracy: the mean of ``Phi(m / s)`` over the target's validation
        images (``m`` its margin at ``offset``, ``s`` Silverman's bandwidth of the old model's target
        margins). Of two candidates that get the same number of target images right, the one whose target
        images sit further on the right side of the boundary scores higher."""
        t = self.target_mask
        if not t.any():
            return float("nan")
        m = margins(logits[t], self.labels[t], self.target, offset)
        return float(norm.cdf(m / self.target_bandwidth).mean())

    def assess(self, logits: np.ndarray, *, calibrate: bool, rivals: bool = False) -> Assessment:
        """The best admissible offset for one candidate's validation ``logits`` (offset 0 without
        ``calibrate``), with the evidence at that offset. With ``rivals`` the offset is then grown per
        rival class (``grow_rival_offsets``) and the evidence is at those offsets."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape != self.old.shape or not np.isfinite(logits).all():
            raise ValueError("candidate logits must be finite and shaped like the old model's")
        offset = self._offset(logits) if calibrate else 0.0
        per_rival: tuple[float, ...] | None = None
        at, off = logits, offset
        floors = None
        if calibrate and rivals and self.target_mask.any():
            start = offset if self.probability(logits, offset) >= self.q else 0.0
            tails = self._tails(logits, start)
            o = self.grow_rival_offsets(logits, start, tails)
            per_rival, at, off = tuple(float(x) for x in o), rival_offsets(logits, self.target, o), 0.0
            floors = self.rival_floors(logits, start, o, tails)
        ev = self.evidence(at, off, floors)
        prob = float(np.prod([e.probability for e in ev]))
        return Assessment(
            offset,
            self.target_accuracy(at, off),
            prob,
            prob >= self.q,
            tuple(ev),
            self.target_smooth(at, off),
            per_rival,
        )

    def grow_rival_offsets(self, logits: np.ndarray, start: float, tails: _Tails | None = None) -> np.ndarray:
        """Target offsets per rival class (``rival_offsets``), grown from ``start`` against every rival one
        validation target image at a time. Each move raises the offset against one rival past the gap of
        the next target image that competes with it (to the midpoint before the gap after, as
        ``offset_points`` places a single offset); of the moves that keep the candidate admissible, the one
        that leaves the predicted chance that every capability certifies highest is taken, until none is
        left. Offsets only grow from ``start``, so the target never loses an image the single offset got
        right, and a rival no target image competes with keeps ``start``. A move is judged with the
        exchangeable tail of the rival's own images (``rival_floors``; ``tails``: what ``_tails`` read of
        this candidate at ``start``, if the caller has it), not the kernel alone."""
        z = np.asarray(logits, dtype=np.float64)
        t = self.target
        o = np.full(z.shape[1], float(start))
        tails = tails if tails is not None else self._tails(z, start)
        rest = z.copy()
        rest[:, t] = -np.inf
        rival, gap = rest.argmax(1), rest.max(1) - z[:, t]  # a target image is right where o[rival] > gap
        mine = self.target_mask
        while True:
            best: tuple[float, int, float] | None = None
            for k in range(z.shape[1]):
                g = np.sort(gap[mine & (rival == k)])
                g = g[g >= o[k]]
                if k == t or not len(g):
                    continue
                after = g[g > g[0] + OFFSET_RESOLUTION]
                step = max((g[0] + after[0]) / 2 if len(after) else g[0] + 1.0, g[0] + OFFSET_RESOLUTION)
                trial = o.copy()
                trial[k] = step
                p = self.probability(rival_offsets(z, t, trial), 0.0, self.rival_floors(z, start, trial, tails))
                if p >= self.q and (best is None or p > best[0]):
                    best = (p, k, step)
            if best is None:
                return o
            o[best[1]] = best[2]

    def _tails(self, z: np.ndarray, start: float) -> _Tails:
        """What ``rival_floors`` needs of one candidate, computed once per growth: each capability's smooth
        drop at ``start``, and for each of its classes the class's index, its validation image count and
        the sorted gaps (own logit minus the target's) of its images that the target would take from it
        (those whose strongest non-target class is their own)."""
        t = self.target
        rest = z.copy()
        rest[:, t] = -np.inf
        own = rest.argmax(1) == self.labels
        gap = z[np.arange(len(z)), self.labels] - z[:, t]
        drops = [e.drop for e in self.evidence(z, start)]
        per: list[list[tuple[int, int, np.ndarray]]] = []
        for cap in self.caps:
            rows = []
            for k in cap.class_indices:
                mk = self.labels == k
                rows.append((k, int(mk.sum()), np.sort(gap[mk & own])))
            per.append(rows)
        return drops, per

    def rival_floors(
        self,
        logits: np.ndarray,
        start: float,
        offsets: np.ndarray,
        tails: _Tails | None = None,
    ) -> list[Floor | None]:
        """The smooth drop each capability is predicted at least at, with per-rival ``offsets`` grown from
        ``start``: its drop at ``start`` plus the exchangeable share of its images the growth takes
        (``exchangeable_tail``), with that share's own sampling variance (about share / n: at the nearest
        gap, one image in n + 1 is as uncertain as it is large). The kernel's Gaussian tail says next to
        nothing about images further off than any validation image, so without this a rival whose
        validation images happen to sit far from the target looks free however far its offset grows, and
        of nine rivals the emptiest sample is the one grown (docs/selection.md). None where the growth
        has not moved a capability's offsets."""
        drops, per = tails if tails is not None else self._tails(np.asarray(logits, dtype=np.float64), start)
        out: list[Floor | None] = []
        for drop, rows in zip(drops, per):
            n = sum(nk for _, nk, _ in rows)
            share = var = 0.0
            for k, nk, g in rows:
                if nk:
                    f = exchangeable_tail(g, start, float(offsets[k]), nk)
                    share += nk / n * f
                    var += (nk / n) ** 2 * f * (1.0 - f) / (nk + 2)
            out.append(Floor(drop + share, var) if share > 0 else None)
        return out

    def offset_points(self, logits: np.ndarray) -> np.ndarray:
        """One offset per interval between consecutive target gaps, ascending (target accuracy only
        changes where the offset passes a target image's gap): 0 in the interval that holds it, else the
        midpoint, as far from the validation images on either side as it can be."""
        t = self.target_mask
        gaps = np.unique(-margins(logits[t], self.labels[t], self.target))  # right iff offset > gap
        lo = np.concatenate([[-np.inf], gaps])
        hi = np.concatenate([gaps, [np.inf]])
        with np.errstate(invalid="ignore"):
            mid = np.where(
                np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2, np.where(np.isfinite(lo), lo + 1.0, hi - 1.0)
            )
        return np.where((lo < 0) & (hi >= 0), 0.0, mid)

    def _offset(self, logits: np.ndarray) -> float:
        """The admissible offset with the best target accuracy. The target's accuracy only changes where the
        offset passes a target image's gap, so each interval between consecutive gaps is tried at one point:
        0 where the interval holds it (the least intervention), else its midpoint, as far from the
        validation images on either side as it can be. Of equal target accuracy the offset nearest 0 wins;
        with nothing admissible the candidate is reported at offset 0."""
        if not self.target_mask.any():
            return 0.0
        # from the most target images right (the last interval) down: the first admissible point wins
        for b in self.offset_points(logits)[::-1]:
            if self.probability(logits, float(b)) >= self.q:
                return float(b)
        return 0.0


@dataclass(frozen=True)
class Assessment:
    """One candidate at its chosen offset."""

    offset: float  # logit units at the evaluation temperature
    target_accuracy: float
    probability: float  # that every capability is certified
    admissible: bool
    evidence: tuple[Evidence, ...]
    target_smooth: float = float("nan")  # the tie-break among equal target accuracies (Selector.target_smooth)
    rival_offsets: tuple[float, ...] | None = None  # per rival class (optimize.calibrate: per-rival), else None

    def blocking(self) -> Evidence | None:
        """The capability least likely to pass."""
        return min(self.evidence, key=lambda e: e.probability) if self.evidence else None
