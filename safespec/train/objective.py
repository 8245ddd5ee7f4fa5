"""The target's objective, one class per ``optimize.objective``: cross-entropy over the class prompts, or
the paper's one-way contrastive loss anchored on the target's image-caption pairs with SogCLR's moving
averages (method.md section 4), which are its state."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..evaluate import class_logits


class Objective(Protocol):
    """What the trainer asks of a target objective: the loss of one target batch, and its state for resume."""

    def __call__(self, feats_t, towers, text, cap, yt, pos_n, pos_idx, class_bias) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, st: dict[str, Any]) -> None: ...


class CrossEntropy:
    """Cross-entropy of the target batch over every class, at the objective's temperature."""

    def __init__(self, temperature: float, target_index: int):
        self.temperature, self.target_index = temperature, target_index

    def __call__(self, feats_t, towers, text, cap, yt, pos_n, pos_idx, class_bias) -> torch.Tensor:
        logits = class_logits(feats_t, text, self.temperature, class_bias, towers)
        return F.cross_entropy(logits.float(), yt)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        return None


class Contrastive:
    """One-way contrastive loss of each positive pair against the batch's negative captions and images;
    the denominators are SogCLR moving averages per target image (u1, u2), seen through the target's own
    image tower where it has one."""

    def __init__(self, temperature: float, target_index: int, n_images: int, gamma: float, device):
        self.temperature, self.target_index, self.gamma = temperature, target_index, gamma
        self.sog_u1 = torch.zeros(n_images, device=device)
        self.sog_u2 = torch.zeros(n_images, device=device)
        self.sog_seen = torch.zeros(n_images, dtype=torch.bool, device=device)

    def __call__(self, feats_t, towers, text, cap, yt, pos_n, pos_idx, class_bias) -> torch.Tensor:
        feats_t = towers.get(self.target_index, feats_t)
        t = self.temperature
        xi, xn = feats_t[:pos_n], feats_t[pos_n:]
        ti, tn = cap[:pos_n], cap[pos_n:]
        sii = (xi * ti).sum(1, keepdim=True)
        g1 = torch.exp((xi @ tn.T - sii) / t).mean(1)  # image i vs negative captions
        g2 = torch.exp((xn @ ti.T).T / t - sii / t).mean(1)  # negative images vs caption i
        with torch.no_grad():
            gam = self.gamma
            seen = self.sog_seen[pos_idx]
            self.sog_u1[pos_idx] = torch.where(seen, (1 - gam) * self.sog_u1[pos_idx] + gam * g1.detach(), g1.detach())
            self.sog_u2[pos_idx] = torch.where(seen, (1 - gam) * self.sog_u2[pos_idx] + gam * g2.detach(), g2.detach())
            self.sog_seen[pos_idx] = True
        return (t * (g1 / self.sog_u1[pos_idx] + g2 / self.sog_u2[pos_idx])).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"sog_u1": self.sog_u1, "sog_u2": self.sog_u2, "sog_seen": self.sog_seen}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.sog_u1, self.sog_u2, self.sog_seen = st["sog_u1"], st["sog_u2"], st["sog_seen"]
