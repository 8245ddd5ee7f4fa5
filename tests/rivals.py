"""Validation logits where one target offset per rival class beats a single offset (tests of per-rival
calibration in safespec and in the bench replay)."""

from __future__ import annotations

import numpy as np


def rival_logits(n: int, flipped: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes 0 and 1 protected, 2 the target, ``n`` images each. Half the target images have class 0 as
    their strongest rival and sit 0.5 below it, half class 1 and sit 2.0 below; ``flipped`` of class 1's
    images have the target 0.3 below their own logit, class 0's have it 5 below. A single offset that
    rescues the first half of the targets flips those class-1 images; an offset against class 0 alone
    flips nobody."""
    y = np.repeat(np.arange(3), n)
    own = np.random.default_rng(0).normal(0.0, 0.2, len(y))  # margins that vary, as real ones do
    z = np.full((len(y), 3), -5.0)
    z[np.arange(len(y)), y] = own
    t = np.flatnonzero(y == 2)
    z[t[: n // 2], 0], z[t[n // 2 :], 1] = own[t[: n // 2]] + 0.5, own[t[n // 2 :]] + 2.0
    c1 = np.flatnonzero(y == 1)[:flipped]
    z[c1, 2] = own[c1] - 0.3
    return z, y
