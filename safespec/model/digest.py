"""Digests of weights: the identity of a model in result.json, caches and checkpoints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
import torch.nn as nn


# ------------------------------------------------------------------------------------------ digests
def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order: the same weights give the same
    digest whatever device they sit on or in which order a file stored them."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(
            name.encode("utf-8") + b"\0" + str(t.dtype).encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0"
        )
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """Digest of a module's weights (heads included for a :class:`HeadedCLIP`)."""
    return tensor_digest(model.state_dict())
