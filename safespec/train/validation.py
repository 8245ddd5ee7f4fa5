"""What a validation evaluation records beside selection's assessment: each capability's constraint value
(the training metric over its validation images, against the old model's) and its plain paired accuracy
drop. Pure functions of two predictions, so bench and tests compute them exactly as the trainer does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..evaluate import Predictions, kl_from_old, margin_drops, metric_values
from ..plan import Constraint
from .weights import focal_weights


def constraint_values(constraints: Sequence[Constraint], metric: str, new: Predictions, old: Predictions) -> np.ndarray:
    """Per capability: mean metric(new) - mean metric(old) - slack over the capability's images (for the
    distill metrics: the mean weighted KL from the old model's prediction, minus the slack; for 'margin' the
    mean weighted fall of the soft margin below the old model's)."""
    if metric in ("distill", "focal-distill"):
        m_new = kl_from_old(old.log_probs, new.log_probs) * focal_weights(old.correct, metric)
        m_old = np.zeros(len(old.labels))
    elif metric == "margin":
        m_new = margin_drops(old.losses, new.losses) * focal_weights(old.correct, metric)
        m_old = np.zeros(len(old.labels))
    else:
        m_new = metric_values(new.losses, new.margins, metric)
        m_old = metric_values(old.losses, old.margins, metric)
    out = np.zeros(len(constraints))
    for k, c in enumerate(constraints):
        mask = np.isin(new.labels, c.class_indices)
        out[k] = float((m_new[mask] - m_old[mask]).mean()) - c.slack if mask.any() else 0.0
    return out


def validation_drops(constraints: Sequence[Constraint], new: Predictions, old: Predictions) -> np.ndarray:
    """Per capability: the plain paired accuracy drop on its validation images (for the record)."""
    drops = np.zeros(len(constraints))
    for k, c in enumerate(constraints):
        mask = np.isin(new.labels, c.class_indices)
        if mask.any():
            drops[k] = float(old.correct[mask].mean() - new.correct[mask].mean())
    return drops
