"""A zero-shot classifier over a headed CLIP: class prompts encoded once, images classified in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .device import model_autocast
from .headed import HeadedCLIP, build_class_tokens, class_logits


@dataclass
class ZeroShotOutput:
    logits: torch.Tensor  # (N, C) float32, on CPU
    predictions: torch.Tensor  # (N,) int64, on CPU


class ZeroShotClassifier:
    """Classify images by their cosine similarity to each class's prompt embedding (through its own head)."""

    def __init__(
        self,
        model: HeadedCLIP,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        templates: Sequence[str],
        tau: float = 0.05,
        precision: str = "fp32",
    ):
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.model = model
        self.tau = float(tau)
        self.precision = precision
        self.templates = tuple(templates)
        self.class_tokens = build_class_tokens(tokenizer, model.classes, self.templates)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_features(self, *, grad: bool = False) -> torch.Tensor:
        """(C, D) class embeddings; without gradients unless ``grad`` (training through the text tower)."""
        tokens = self.class_tokens.to(self.device)
        with model_autocast(self.device, self.precision), torch.set_grad_enabled(grad):
            return self.model.class_text_features(tokens)

    def logits(self, images_or_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) cosine / tau for a batch of images (N, 3, H, W) or of image features (N, D)."""
        if text_features is None:
            text_features = self.text_features()
        x = images_or_features
        towers: dict[int, torch.Tensor] = {}
        if x.dim() == 4:
            with model_autocast(self.device, self.precision):
                images = x.to(self.device)
                x = self.model.encode_image(images)
                towers = self.model.encode_tower_images(images)
        elif self.model.class_towers:
            raise ValueError("a model with class image towers classifies images, not shared features")
        return class_logits(
            F.normalize(x.float(), dim=-1),
            F.normalize(text_features.float().to(x.device), dim=-1),
            self.tau,
            self.model.decision_bias,
            {c: F.normalize(f.float(), dim=-1) for c, f in towers.items()},
        )  # as the shared features

    @torch.no_grad()
    def predict_batches(self, batches: Iterable[Any]) -> ZeroShotOutput:
        """Logits and predictions over batches of images (a tensor, or a tuple whose first item is one);
        the text side is computed once for all batches."""
        was_training = self.model.training
        self.model.eval()
        try:
            text = self.text_features()
            out = []
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                out.append(self.logits(images, text).cpu())
        finally:
            self.model.train(was_training)
        logits = torch.cat(out) if out else torch.zeros(0, len(self.model.classes))
        return ZeroShotOutput(logits=logits, predictions=logits.argmax(dim=1))
