"""Checkpoint selection's bookkeeping: the best admissible candidate so far (its step, score, offset and
weights) and the best one selection refused, with what blocked it. The rule that decides admissibility is
safespec.certify.selection's; this module only remembers what it said, so that the outcome, the report
and a resumed run all see the same choice."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..certify.selection import Assessment


@dataclass
class Candidates:
    """The best candidate and the best refused one. ``best_state`` None means the old model, as it was."""

    min_certify_probability: float
    best_step: int = 0
    best_score: float = -math.inf
    best_offset: float = 0.0
    best_rival_offsets: list[float] | None = None  # per rival class, in place of best_offset (per-rival)
    best_smooth: float = -math.inf  # the tie-break: the kernel-smoothed target accuracy of the best
    best_state: dict[str, torch.Tensor] | None = None
    blocked: dict[str, Any] | None = field(default=None)  # the best candidate that selection refused, and why

    def consider(
        self,
        step: int,
        v: dict[str, Any],
        *,
        eligible: bool,
        weights: Callable[[], dict[str, torch.Tensor]],
        with_offset: Callable[[dict[str, torch.Tensor], float, list[float] | None], dict[str, torch.Tensor]],
    ) -> None:
        """Take the evaluation ``v`` of the model at ``step``: keep it when it is eligible and scores best
        (of equal scores, the higher smoothed target accuracy; ``weights()`` copies the model's weights
        only then), remember it when it is refused and scores
        better than every refused one so far."""
        if not eligible and step > 0 and (self.blocked is None or v["score"] > self.blocked["target"]):
            self.blocked = blocked_summary(step, v, self.min_certify_probability)
        smooth = v.get("smooth", -math.inf)
        if math.isnan(smooth):
            smooth = -math.inf
        if eligible and (v["score"], smooth) > (self.best_score, self.best_smooth):
            self.best_step, self.best_score, self.best_offset = step, v["score"], v["offset"]
            self.best_rival_offsets = rivals = v.get("rival_offsets")
            self.best_smooth = smooth
            moved = v["offset"] or (rivals is not None and any(rivals))
            self.best_state = with_offset(weights(), v["offset"], rivals) if (step > 0 or moved) else None

    def state_dict(self) -> dict[str, Any]:
        """What resume needs (the weights travel separately: they are large and often absent)."""
        return {
            "best_step": self.best_step,
            "best_score": self.best_score,
            "best_offset": self.best_offset,
            "best_rival_offsets": json.dumps(self.best_rival_offsets),
            "best_smooth": self.best_smooth,
            "blocked": json.dumps(self.blocked),
        }

    def load_state_dict(self, st: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
        self.best_step, self.best_score, self.best_offset = st["best_step"], st["best_score"], st["best_offset"]
        self.best_rival_offsets = json.loads(st["best_rival_offsets"])
        self.best_smooth = st["best_smooth"]
        self.best_state = best_state
        self.blocked = json.loads(st.get("blocked", "null"))


def blocked_summary(step: int, v: dict[str, Any], q: float) -> dict[str, Any]:
    """A refused candidate, for the report: its target, its chance of passing every certificate, the
    capability that blocked it most and the evidence that capability would have needed."""
    a: Assessment = v["assessment"]
    e = a.blocking()
    return {
        "step": step,
        "target": v["score"],
        "certify_probability": a.probability,
        "capability": e.name if e else None,
        "evidence": [x.to_dict() for x in a.evidence],
        "summary": (
            f"step {step} (validation target {v['score']:.3f}) was refused: the chance that every "
            f"capability passes the held-out certificate was {a.probability:.2f} < {q:.2f}; "
            + (
                f"{e.name!r} blocked it most (P = {e.probability:.2f}: smooth validation drop "
                f"{e.drop:+.2%}, {e.flips[0]} negative / {e.flips[1]} positive flips of {e.n}, predicted "
                f"drop bound {e.predicted_bound:.2%} against a tolerance of {e.tolerance:.2%}); it would "
                f"have needed {e.needed(q ** (1 / max(len(a.evidence), 1)))}"
                if e
                else ""
            )
        ),
    }
