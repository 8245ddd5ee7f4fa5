"""The methods' names and the weight each constraint gets in a step: the penalty's beta (and its schedule),
the Lagrangian's multipliers, none for the baselines; and focal distillation's per-image weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CONSTRAINED = ("penalty", "lagrangian")


# ------------------------------------------------------------------------------------------ helpers
#: Focal distillation (Yan et al., CVPR 2021, "Positive-Congruent Training"): an image the old model
#: classifies correctly weighs 1 + FOCAL_BETA, one it gets wrong weighs 1 (their alpha = 1, beta = 5).
FOCAL_BETA = 5.0


def focal_weights(old_correct: np.ndarray, metric: str) -> np.ndarray:
    """Per-image weights of the divergence: 1 for 'distill'; 1 + FOCAL_BETA where the old model was right
    for 'focal-distill', so that the constraint spends its budget on the images a negative flip could
    come from."""
    c = np.asarray(old_correct, dtype=np.float32)
    return 1.0 + FOCAL_BETA * c if metric == "focal-distill" else np.ones_like(c)


def beta_at(step: int, total: int, beta: float, schedule: str) -> float:
    if schedule == "cosine":
        return beta * 0.5 * (1.0 - math.cos(math.pi * step / max(1, total)))
    return beta


# ------------------------------------------------------------------------------------------ constraints
@dataclass
class ConstraintWeights:
    """Per-constraint state of a constrained method and the rule that turns it into penalty weights.

    ``update(c, present, step)`` takes this step's constraint estimates c_k (only those ``present`` in the
    batch count), folds them into the moving averages u_k (first visit sets u_k), updates the multipliers,
    and returns each constraint's weight w_k. The training loss adds ``w_k * L_k(new)`` so that its gradient
    is the penalty (or Lagrangian) gradient: beta [u_k]_+ grad L_k for the squared hinge, beta 1[u_k > 0]
    grad L_k for the hinge, (lambda_k + rho u_k)_+ grad L_k for the Lagrangian, a constant beta for replay.
    Invalid settings fail here, at construction, not mid-training.
    """

    method: str
    u: torch.Tensor
    seen: torch.Tensor
    lam: torch.Tensor
    gamma: float = 0.8
    beta: float = 100.0
    beta_schedule: str = "constant"
    form: str = "squared-hinge"
    multiplier_lr: float = 10.0
    rho: float = 0.0
    max_multiplier: float = 1e4
    total_steps: int = 1

    def __post_init__(self):
        if self.method not in ("penalty", "lagrangian", "replay", "unconstrained"):
            raise ValueError(f"no constraint weights for method {self.method!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (got {self.gamma})")
        if self.form not in ("squared-hinge", "hinge") or self.beta_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown penalty form/schedule {self.form!r}/{self.beta_schedule!r}")
        if self.beta <= 0 or self.multiplier_lr <= 0 or self.rho < 0:
            raise ValueError("beta and multiplier_lr must be positive, rho non-negative")

    @classmethod
    def zeros(cls, method: str, k: int, device="cpu", **kw) -> ConstraintWeights:
        z = lambda dt=torch.float32: torch.zeros(k, dtype=dt, device=device)  # noqa: E731
        return cls(method=method, u=z(), seen=z(torch.bool), lam=z(), **kw)

    @classmethod
    def from_plan(cls, method: str, k: int, o, device="cpu") -> ConstraintWeights:
        return cls.zeros(
            method,
            k,
            device,
            gamma=o.gamma,
            beta=o.beta,
            beta_schedule=o.beta_schedule,
            form=o.penalty_form,
            multiplier_lr=o.multiplier_lr,
            rho=o.rho,
            max_multiplier=o.max_multiplier,
            total_steps=o.steps,
        )

    @torch.no_grad()
    def update(self, c: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        if self.method == "replay":
            return torch.full_like(c, self.beta)
        g = self.gamma
        self.u = torch.where(present, torch.where(self.seen, (1 - g) * self.u + g * c, c), self.u)
        self.seen = self.seen | present
        if self.method == "penalty":
            beta = beta_at(step, self.total_steps, self.beta, self.beta_schedule)
            return beta * (self.u.clamp(min=0) if self.form == "squared-hinge" else (self.u > 0).float())
        # lagrangian: weight from the current multipliers, then one ascent step on the constraints seen
        w = (self.lam + self.rho * self.u).clamp(min=0)
        self.lam = torch.where(
            present, (self.lam + self.multiplier_lr * self.u).clamp(0, self.max_multiplier), self.lam
        )
        return w

    def state_dict(self) -> dict:
        return {"u": self.u, "seen": self.seen, "lam": self.lam}

    def load_state_dict(self, st: dict) -> None:
        self.u, self.seen, self.lam = st["u"], st["seen"], st["lam"]
