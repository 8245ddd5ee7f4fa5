"""The one forward call of a training step (so that DDP sees a single module), and small tensor helpers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host index rows on ``device`` without waiting: a blocking host-to-device copy synchronises the
    stream, and a step must never wait for the GPU (bench/gpu.py checks this in CUDA's sync-debug mode)."""
    return torch.from_numpy(np.asarray(rows)).to(device, non_blocking=True)


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Towers(torch.nn.Module):
    """Everything a step encodes, in one forward call: DistributedDataParallel hooks the gradients of
    the module it wraps through its forward, so the image batch, the class prompts and the captions go
    through this one call (each rank passing its own shard of each)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(
        self,
        images,
        prompts,
        prompt_heads,
        captions=None,
        caption_heads=None,
        *,
        hidden: bool = False,
        shared: bool = True,
    ):
        """``hidden``: the text inputs are the frozen text tower's outputs; only the projection and the
        heads run. ``shared``: run the shared image tower (False: its features are cached, and the images
        go through the class image towers only)."""
        img = self.model.encode_image(images) if images is not None and shared else None
        towers = self.model.encode_tower_images(images) if images is not None else {}
        text = (
            (lambda h, ids: F.normalize(self.model.project_text(h, ids), dim=-1)) if hidden else self.model.encode_text
        )
        txt = text(prompts, prompt_heads) if prompts is not None else None
        cap = text(captions, caption_heads) if captions is not None else None
        return img, towers, txt, cap
