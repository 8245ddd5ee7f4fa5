"""The model stage: the open_clip factory, task-dependent heads, class image towers, checkpoints, digests
and the zero-shot classifier.

One factory turns the spec's ``model`` section into a :class:`LoadedModel`, whatever the weights' source
(an open_clip pretrained tag, an ``hf-hub:`` name, or a local checkpoint of the old model), so that every
later stage sees the same object and the report can name exactly which weights were used (their digest).

Task-dependent heads (method.md §3) give each class its own low-rank correction of the text projection,
``h @ (W + A_k B_k)``, plus one extra head for negatives. They are computed as ``h @ W + (h @ A_k) @ B_k``
grouped by head, because the per-sample ``W + A_k B_k`` of the paper's reference code costs two orders of
magnitude more time and memory than the projection itself (see ``bench/heads.py``). ``B`` starts at zero,
so a freshly headed model computes exactly, to the bit, what the model without heads computes.

Modules: ``registry`` (architecture names, the shipped configs), ``device``, ``digest``, ``heads`` (the
kernel and the module), ``headed`` (the headed CLIP and its logits), ``hub`` (pretrained weights),
``checkpoint``, ``factory`` (create / load), ``zero_shot``.
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .device import model_autocast, resolve_device
from .digest import tensor_digest, weights_digest
from .factory import LoadedModel, create_model, load_model, preprocess_config
from .headed import (
    TOWER_PREFIX,
    DecisionBias,
    HeadedCLIP,
    build_class_tokens,
    class_logits,
    tower_indices,
    zero_shot_logits,
)
from .heads import LowRankHeads, grouped_low_rank, naive_routed_projection
from .registry import SHIPPED_ARCHS, register_shipped_configs
from .zero_shot import ZeroShotClassifier, ZeroShotOutput

__all__ = [
    "CHECKPOINT_FORMAT",
    "SHIPPED_ARCHS",
    "TOWER_PREFIX",
    "DecisionBias",
    "HeadedCLIP",
    "LoadedModel",
    "LowRankHeads",
    "ZeroShotClassifier",
    "ZeroShotOutput",
    "build_class_tokens",
    "class_logits",
    "create_model",
    "grouped_low_rank",
    "load_checkpoint",
    "load_model",
    "model_autocast",
    "naive_routed_projection",
    "preprocess_config",
    "read_checkpoint_metadata",
    "register_shipped_configs",
    "resolve_device",
    "save_checkpoint",
    "tensor_digest",
    "tower_indices",
    "weights_digest",
    "zero_shot_logits",
]
