"""The wise-ft baseline (Wortsman et al., 2022): weight-space interpolation between the old model and an
unconstrained fine-tune, the largest mixing weight that keeps every constraint on validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model import TOWER_PREFIX
from .data import TrainOutcome
from .towers import _cpu_state

if TYPE_CHECKING:
    from .trainer import Trainer


def _mix(old: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], a: float) -> dict[str, torch.Tensor]:
    """(1 - a) old + a ft, weight by weight. A weight the fine-tune left alone stays exactly as it was
    ((1 - a) x + a x is not x in floats): with a target tower, every other class's logit stays the old
    model's to the bit."""
    return {
        k: (old[k].float() * (1 - a) + ft[k].float() * a).to(old[k].dtype)
        if old[k].is_floating_point() and not torch.equal(old[k], ft[k])
        else ft[k]
        for k in old
    }


def run(t: Trainer, *, resume: bool) -> TrainOutcome:
    """Fine-tune without constraints (an inner unconstrained run), then walk the mixing weight from the
    fine-tune (1) towards the old model (0) and keep the largest that validation admits."""
    from .trainer import Trainer  # here, not at the top: the trainer imports this module

    inner = Trainer(
        t.plan,
        t.loaded,
        t.data,
        method="unconstrained",
        run_dir=t.run_dir,
        cache=t.cache,
        quiet=t.quiet,
        log=t.log,
        tag=f"{t.tag}-finetune",
    )
    inner.run(resume=resume)
    ft = _cpu_state(t.model)
    # a class image tower the fine-tune added starts from the old shared tower: that is its alpha = 0
    old = {
        **{
            k: t.old_state["clip.visual." + k.split(".", 2)[2]]
            for k in ft
            if k.startswith(TOWER_PREFIX) and k not in t.old_state
        },
        **t.old_state,
    }
    best = None
    t.trajectory = []
    for i in range(t.o.wise_ft.grid - 1, -1, -1):
        a = i / (t.o.wise_ft.grid - 1)
        mixed = _mix(old, ft, a)
        t.model.load_state_dict(mixed)
        t.step = round(a * 1000)  # the "step" of a mixing weight, for the trajectory only
        v = t.validate() if a > 0 else t.validate_old()
        t.trajectory.append(
            {
                "alpha": a,
                "step": t.step,
                "target_metric": v["target"],
                "constraints": {c.name: float(x) for c, x in zip(t.constraints, v["constraints"])},
                "feasible": v["feasible"],
            }
        )
        if v["feasible"]:
            best = (a, mixed, v)
            break
    if best is None:
        # not even the old model is admissible (a held-out split too small to certify anything): keep it,
        # as the constrained methods do when nothing is admissible
        a, chosen = 0.0, t.old_state
        reason = (
            "no mixing weight between the old model (0) and the unconstrained fine-tune (1) keeps every "
            "constraint on validation, not even 0: the old model is kept"
        )
    else:
        a, chosen, _ = best
        if a == 0:  # the old model itself, not a copy of it with an untrained tower
            chosen = t.old_state
        reason = (
            f"largest mixing weight alpha={a:.2f} between the old model (0) and the unconstrained "
            f"fine-tune (1) that keeps every constraint on validation"
        )
    t.model.load_state_dict(chosen)
    t._write_trajectory()
    return TrainOutcome(
        method="wise-ft",
        state_dict=_cpu_state(t.model),
        selected_step=inner.step,
        fell_back_to_old=a == 0,
        reason=reason,
        trajectory=t.trajectory,
        steps=inner.step,
        seconds=inner.seconds,
        validation={"alpha": a},
    )
