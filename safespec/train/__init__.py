"""The training stage: the constrained optimizer and its baselines, from a plan, an old model and the
training splits to a selected candidate (docs/selection.md says how the candidate is chosen).

Modules: ``data`` (what training takes and gives), ``methods`` (one class per method, registered by name),
``weights`` (focal distillation's per-image weights), ``schedule`` (the learning rate), ``towers`` (the step's one forward call), ``trainer`` (the loop,
validation, selection, checkpoints and resume)."""

from __future__ import annotations

from ..spec import METHODS  # the methods are named once, in the spec language
from .data import Split, TrainData, TrainOutcome
from .methods import CONSTRAINED, REGISTRY, Lagrangian, Method, Penalty, Replay, Unconstrained, WiseFt, beta_at
from .methods import build as build_method
from .schedule import lr_factor
from .state import STATE_VERSION
from .trainer import Trainer
from .weights import FOCAL_BETA, focal_weights

__all__ = [
    "CONSTRAINED",
    "FOCAL_BETA",
    "METHODS",
    "REGISTRY",
    "STATE_VERSION",
    "Lagrangian",
    "Method",
    "Penalty",
    "Replay",
    "Split",
    "TrainData",
    "TrainOutcome",
    "Trainer",
    "Unconstrained",
    "WiseFt",
    "beta_at",
    "build_method",
    "focal_weights",
    "lr_factor",
]
