"""What training takes and gives: the splits as training sees them, and the outcome of one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Split:
    """One split as training sees it: an image bank, its labels, its digest and (target only) captions."""

    bank: Any  # safespec.data.ImageBank: bank[idx] -> (B,C,H,W); iter_batches(bs)
    labels: np.ndarray
    digest: str
    captions: list[str | None] | None = None  # None: no caption for that row (the template is used)


@dataclass
class TrainData:
    store: Split
    target: Split
    validation: Split
    #: images per class in the held-out split (its size only: selection predicts the certificate it will
    #: face); None: assume the validation split's size
    heldout_counts: np.ndarray | None = None


@dataclass
class TrainOutcome:
    method: str
    state_dict: dict[str, torch.Tensor]  # the selected model (CPU tensors)
    selected_step: int
    fell_back_to_old: bool
    reason: str
    trajectory: list[dict]
    steps: int
    seconds: float
    validation: dict[str, Any] = field(default_factory=dict)
