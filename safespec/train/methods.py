"""One class per method, registered by name (cooper's formulations are the model).

A method owns what differs between methods and nothing else: whether a step draws the store, the store
term's per-image metric, the weight each constraint gets in a step (and the state behind it: the moving
constraint estimates u_k, the Lagrangian's multipliers), its fields of the trajectory, and, for wise-ft, a
run of its own. The loop, validation, selection and checkpoints are the trainer's and are the same for all.

The training loss adds ``w_k * L_k(new)`` for each constraint k in the batch, so that its gradient is the
method's: beta [u_k]_+ grad L_k for the squared-hinge penalty, beta 1[u_k > 0] grad L_k for the hinge,
(lambda_k + rho u_k)_+ grad L_k for the Lagrangian, a constant beta for replay. Invalid settings fail at
construction, not mid-training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..plan import OptimizerPlan
from ..spec import METHODS
from . import wise_ft

if TYPE_CHECKING:
    from .data import TrainOutcome
    from .trainer import Trainer


def beta_at(step: int, total: int, beta: float, schedule: str) -> float:
    """The penalty's beta at ``step`` of ``total``: constant, or a cosine ramp from 0 to beta."""
    if schedule == "cosine":
        return beta * 0.5 * (1.0 - math.cos(math.pi * step / max(1, total)))
    return beta


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1] (got {gamma})")


class Method:
    """What the trainer asks of a method. The base is the unconstrained objective: no store, no weights."""

    name: ClassVar[str]
    #: Selection keeps only candidates predicted to pass every certificate, and the target's offset is
    #: calibrated; a baseline is selected by its target alone, to show what the constraints buy.
    constrained: ClassVar[bool] = False
    #: Each step draws a batch of the protected store and adds its weighted constraint terms.
    draws_store: ClassVar[bool] = False
    #: The store term compares with the old model (replay's plain cross-entropy does not).
    uses_reference: ClassVar[bool] = True
    #: ``model.target_tower`` is added by this trainer (wise-ft's inner run adds it instead).
    adds_target_tower: ClassVar[bool] = True

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.u = torch.zeros(k, device=device)  # moving constraint estimates (zero where unused)
        self.seen = torch.zeros(k, dtype=torch.bool, device=device)

    @classmethod
    def from_plan(cls, o: OptimizerPlan, k: int, device: torch.device | str = "cpu") -> Method:
        return cls(k, device)

    @torch.no_grad()
    def weight(self, c: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        """Each constraint's weight in this step, from its estimate ``c`` (only those ``present`` count)."""
        raise NotImplementedError(f"{self.name} draws no store batch")

    def _fold(self, c: torch.Tensor, present: torch.Tensor, gamma: float) -> None:
        """Fold this step's estimates into the moving averages u_k (a first visit sets u_k)."""
        self.u = torch.where(present, torch.where(self.seen, (1 - gamma) * self.u + gamma * c, c), self.u)
        self.seen = self.seen | present

    def record(self, names: list[str], step: int) -> dict[str, Any]:
        """This method's fields of a trajectory entry."""
        return {"beta": None, "u": dict(zip(names, map(float, self.u.cpu()))), "multipliers": {}}

    def status(self) -> str | None:
        """A few characters for the progress bar, or None."""
        return None

    def run(self, trainer: Trainer, *, resume: bool) -> TrainOutcome | None:
        """A run of the method's own, or None for the trainer's loop."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "seen": self.seen}

    def load_state_dict(self, st: dict[str, torch.Tensor]) -> None:
        self.u, self.seen = st["u"], st["seen"]


class Unconstrained(Method):
    """The target objective alone: the baseline that shows what an unconstrained fine-tune loses."""

    name = "unconstrained"


class Replay(Method):
    """Plain cross-entropy on the store at a constant weight beta, no old-model reference: the
    regulariser baseline."""

    name = "replay"
    draws_store = True
    uses_reference = False

    def __init__(self, k: int, device: torch.device | str = "cpu", *, beta: float = 100.0):
        super().__init__(k, device)
        if beta <= 0:
            raise ValueError(f"beta must be positive (got {beta})")
        self.beta = beta

    @classmethod
    def from_plan(cls, o: OptimizerPlan, k: int, device: torch.device | str = "cpu") -> Method:
        return cls(k, device, beta=o.penalty.beta)

    @torch.no_grad()
    def weight(self, c: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        return torch.full_like(c, self.beta)


class _Constrained(Method):
    constrained = True
    draws_store = True

    def __init__(self, k: int, device: torch.device | str = "cpu", *, gamma: float = 0.8):
        super().__init__(k, device)
        _check_gamma(gamma)
        self.gamma = gamma

    def status(self) -> str | None:
        return f"worst u={float(self.u.max()):+.4f}"


class Penalty(_Constrained):
    """The paper's quadratic penalty on moving-average constraint estimates (method.md section 2)."""

    name = "penalty"

    def __init__(
        self,
        k: int,
        device: torch.device | str = "cpu",
        *,
        gamma: float = 0.8,
        beta: float = 100.0,
        schedule: str = "constant",
        form: str = "squared-hinge",
        total_steps: int = 1,
    ):
        super().__init__(k, device, gamma=gamma)
        if form not in ("squared-hinge", "hinge") or schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown penalty form/schedule {form!r}/{schedule!r}")
        if beta <= 0:
            raise ValueError(f"beta must be positive (got {beta})")
        self.beta, self.schedule, self.form, self.total_steps = beta, schedule, form, total_steps

    @classmethod
    def from_plan(cls, o: OptimizerPlan, k: int, device: torch.device | str = "cpu") -> Method:
        p = o.penalty
        return cls(k, device, gamma=o.gamma, beta=p.beta, schedule=p.schedule, form=p.form, total_steps=o.steps)

    @torch.no_grad()
    def weight(self, c: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        self._fold(c, present, self.gamma)
        beta = beta_at(step, self.total_steps, self.beta, self.schedule)
        return beta * (self.u.clamp(min=0) if self.form == "squared-hinge" else (self.u > 0).float())

    def record(self, names: list[str], step: int) -> dict[str, Any]:
        return {**super().record(names, step), "beta": beta_at(step, self.total_steps, self.beta, self.schedule)}


class Lagrangian(_Constrained):
    """Exact per-constraint multipliers by gradient descent-ascent (optionally augmented by rho), so that
    users need not tune beta."""

    name = "lagrangian"

    def __init__(
        self,
        k: int,
        device: torch.device | str = "cpu",
        *,
        gamma: float = 0.8,
        multiplier_lr: float = 10.0,
        rho: float = 0.0,
        max_multiplier: float = 1e4,
    ):
        super().__init__(k, device, gamma=gamma)
        if multiplier_lr <= 0 or rho < 0:
            raise ValueError("multiplier_lr must be positive, rho non-negative")
        self.multiplier_lr, self.rho, self.max_multiplier = multiplier_lr, rho, max_multiplier
        self.lam = torch.zeros(k, device=device)

    @classmethod
    def from_plan(cls, o: OptimizerPlan, k: int, device: torch.device | str = "cpu") -> Method:
        g = o.lagrangian
        return cls(k, device, gamma=o.gamma, multiplier_lr=g.multiplier_lr, rho=g.rho, max_multiplier=g.max_multiplier)

    @torch.no_grad()
    def weight(self, c: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        self._fold(c, present, self.gamma)
        # the weight from the current multipliers, then one ascent step on the constraints seen
        w = (self.lam + self.rho * self.u).clamp(min=0)
        self.lam = torch.where(
            present, (self.lam + self.multiplier_lr * self.u).clamp(0, self.max_multiplier), self.lam
        )
        return w

    def record(self, names: list[str], step: int) -> dict[str, Any]:
        return {**super().record(names, step), "multipliers": dict(zip(names, map(float, self.lam.cpu())))}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "lam": self.lam}

    def load_state_dict(self, st: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(st)
        self.lam = st["lam"]


class WiseFt(Unconstrained):
    """Weight-space interpolation between the old model and an unconstrained fine-tune (Wortsman et al.,
    2022): the largest mixing weight that keeps every constraint on validation (:mod:`.wise_ft`)."""

    name = "wise-ft"
    adds_target_tower = False  # the inner unconstrained run adds it

    def run(self, trainer: Trainer, *, resume: bool) -> TrainOutcome | None:
        return wise_ft.run(trainer, resume=resume)


#: Every method by its spec name (``optimize.method``).
REGISTRY: dict[str, type[Method]] = {m.name: m for m in (Penalty, Lagrangian, Unconstrained, Replay, WiseFt)}
if tuple(REGISTRY) != METHODS:  # pragma: no cover - a method added to the spec language but not here
    raise ImportError(f"train.methods registers {tuple(REGISTRY)}, the spec language names {METHODS}")
CONSTRAINED: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.constrained)


def build(name: str, o: OptimizerPlan, k: int, device: torch.device | str = "cpu") -> Method:
    """The method ``name`` with its settings from the plan, for ``k`` constraints."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(REGISTRY)}") from None
    return cls.from_plan(o, k, device)
