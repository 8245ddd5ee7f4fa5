"""Focal distillation's per-image weights of the store's divergence from the old model."""

from __future__ import annotations

import numpy as np

#: Focal distillation (Yan et al., CVPR 2021, "Positive-Congruent Training"): an image the old model
#: classifies correctly weighs 1 + FOCAL_BETA, one it gets wrong weighs 1 (their alpha = 1, beta = 5).
FOCAL_BETA = 5.0

#: The metrics weighted this way ('margin' too: only an image the old model gets right can flip negative).
FOCAL_METRICS = ("focal-distill", "margin")


def focal_weights(old_correct: np.ndarray, metric: str) -> np.ndarray:
    """Per-image weights of the divergence: 1 for 'distill'; 1 + FOCAL_BETA where the old model was right
    for 'focal-distill' and 'margin', so that the constraint spends its budget on the images a negative flip could
    come from."""
    c = np.asarray(old_correct, dtype=np.float32)
    return 1.0 + FOCAL_BETA * c if metric in FOCAL_METRICS else np.ones_like(c)
