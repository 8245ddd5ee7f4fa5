"""The training stage: the constrained optimizer and its baselines, from a plan, an old model and the
training splits to a selected candidate (docs/selection.md says how the candidate is chosen).

Modules: ``data`` (what training takes and gives), ``weights`` (the methods and each constraint's weight in
a step), ``schedule`` (the learning rate), ``towers`` (the step's one forward call), ``trainer`` (the loop,
validation, selection, checkpoints and resume)."""

from __future__ import annotations

from ..spec import METHODS  # the methods are named once, in the spec language
from .data import Split, TrainData, TrainOutcome
from .schedule import lr_factor
from .state import STATE_VERSION
from .trainer import Trainer
from .weights import CONSTRAINED, FOCAL_BETA, ConstraintWeights, beta_at, focal_weights

__all__ = [
    "CONSTRAINED",
    "FOCAL_BETA",
    "METHODS",
    "STATE_VERSION",
    "ConstraintWeights",
    "Split",
    "TrainData",
    "TrainOutcome",
    "Trainer",
    "beta_at",
    "focal_weights",
    "lr_factor",
]
