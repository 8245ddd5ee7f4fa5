"""Run a model over a split: per-sample predictions, losses and margins, cached by content digest.

Evaluation is the cost a release step cannot avoid, so it is done once per (model, data, prompts, tau):
the old model's outputs on the protected store (the constraints' reference), on validation and on the
held-out split are computed once and reused by every later run, candidate and baseline.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import cache_root
from .distributed import context as dist_context
from .errors import atomic_write_bytes
from .model import DecisionBias, class_logits, tensor_digest


@dataclass(frozen=True)
class Predictions:
    """Per-sample outputs of one model on one split, in manifest order."""

    labels: np.ndarray  # int64 (N,)
    preds: np.ndarray  # int64 (N,)
    losses: np.ndarray  # float32 (N,) cross-entropy of the zero-shot logits (cos / tau)
    margins: np.ndarray  # float32 (N,) true-class logit minus the best other logit
    log_probs: np.ndarray | None = None  # float32 (N, C), only when asked for (the 'distill' metric)

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    def per_class_accuracy(self, num_classes: int) -> np.ndarray:
        acc = np.full(num_classes, np.nan)
        for c in range(num_classes):
            m = self.labels == c
            if m.any():
                acc[c] = float(self.correct[m].mean())
        return acc

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"labels": self.labels, "preds": self.preds, "losses": self.losses, "margins": self.margins}
        if self.log_probs is not None:
            arrays["log_probs"] = self.log_probs
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path: Path) -> Predictions:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                labels=z["labels"],
                preds=z["preds"],
                losses=z["losses"],
                margins=z["margins"],
                log_probs=z["log_probs"] if "log_probs" in z.files else None,
            )


#: Losses below this are treated as this (a soft margin of about 13.8): float32 cannot resolve smaller ones.
MIN_LOSS = 1e-6

#: The metrics whose per-image value compares the new model with the old one on the same image (0 for the
#: old model itself), rather than a value of one model that is compared as a mean.
PAIRED_METRICS = ("distill", "focal-distill", "margin")


def kl_from_old(old_log_probs, new_log_probs):
    """Per-sample KL(old || new) of two rows of class log-probabilities: the 'distill' metric."""
    if isinstance(new_log_probs, np.ndarray):
        old = np.asarray(old_log_probs, dtype=np.float64)
        return (np.exp(old) * (old - new_log_probs)).sum(1)
    return F.kl_div(new_log_probs, old_log_probs, log_target=True, reduction="none").sum(1)


def soft_margins(losses):
    """The true class's log-odds, log p - log(1 - p), from its cross-entropy -log p: the logit's lead over
    the log-sum of every other class's, at the temperature the losses were computed at. Unlike the loss it
    keeps resolving an image the model fits almost exactly (a loss of 1e-4 or 2e-4 is 9.2 or 8.5)."""
    if isinstance(losses, np.ndarray):
        ce = np.maximum(np.asarray(losses, dtype=np.float64), MIN_LOSS)
        return -ce - np.log(-np.expm1(-ce))
    ce = losses.float().clamp(min=MIN_LOSS)
    return -ce - torch.log(-torch.expm1(-ce))


def margin_drops(old_losses, new_losses):
    """Per-sample fall of the soft margin below the old model's (0 where it held or grew): the 'margin'
    metric. One-sided, so pushing a wrong class further down (what the target's own objective does to
    every negative) costs the constraint nothing."""
    d = soft_margins(old_losses) - soft_margins(new_losses)
    return np.maximum(d, 0.0) if isinstance(d, np.ndarray) else d.clamp(min=0.0)


def metric_values(pred_losses: torch.Tensor | np.ndarray, margins, metric: str):
    """Per-sample value of a constraint metric: 'loss' is the CE itself, 'smooth-accuracy' a sigmoid of
    the negative margin (a differentiable error rate). ('distill' compares two models' whole predictions:
    :func:`kl_from_old`.)"""
    if metric in PAIRED_METRICS:
        raise ValueError(f"the {metric!r} metric compares two models per image: use kl_from_old or margin_drops")
    if metric == "loss":
        return pred_losses
    if isinstance(margins, np.ndarray):
        return 1.0 / (1.0 + np.exp(margins))
    return torch.sigmoid(-margins)


def logits_losses(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    bias: torch.Tensor | DecisionBias | None = None,
    towers: Mapping[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-shot logits (:func:`class_logits`), per-sample CE and true-minus-best-other margins for a batch."""
    logits = class_logits(image_features, text_features, tau, bias, towers)
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return logits, losses, true - other


def _batches(bank, n: int, batch_size: int, features: torch.Tensor | None):
    """``(indices, images or None)`` over this rank's rows; with ``features`` no image is loaded."""
    d = dist_context()
    lo, hi = d.bounds(n)
    if features is not None:
        for s in range(lo, hi, batch_size):
            yield np.arange(s, min(s + batch_size, hi), dtype=np.int64), None
    else:
        yield from (bank.iter_batches(batch_size, lo, hi) if d.active else bank.iter_batches(batch_size))


@torch.no_grad()
def image_features(
    model, bank, *, batch_size: int = 256, device: str | torch.device = "cpu", autocast=None
) -> torch.Tensor:
    """Normalised image features (N, D) of every image of ``bank``, float32 on the CPU, computed exactly as
    :func:`evaluate` computes them (same batches, same precision), so that predictions from them are the
    same bits."""
    d = dist_context()
    was_training = model.training
    model.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext
    out = []
    try:
        for _, images in _batches(bank, len(bank), batch_size, None):
            with ctx():
                out.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
    finally:
        model.train(was_training)
    local = torch.cat(out) if out else torch.zeros(0, model.embed_dim)
    return torch.as_tensor(d.gather_numpy(local.numpy(), len(bank)))


def visual_digest(model) -> str:
    """Digest of the image tower's weights alone: a fine-tune that froze its image tower shares this digest
    (and so the cached image features) with its old model, whatever happened to its text side."""
    return tensor_digest({k: v for k, v in model.state_dict().items() if k.startswith("clip.visual.")})


def same_visual(a, b) -> bool:
    """Whether two models' image towers hold the same weights, bit for bit: what :func:`visual_digest` would
    say, at the cost of one comparison instead of two hashes."""
    sa, sb = a.state_dict(), b.state_dict()
    ka = sorted(k for k in sa if k.startswith("clip.visual."))
    if ka != sorted(k for k in sb if k.startswith("clip.visual.")):
        return False
    return all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in ka)


def feature_key(visual: str, data_digest: str, precision: str | None) -> str:
    return PredictionCache.key(visual=visual, data=data_digest, precision=precision, what="image-features", v=1)


@torch.inference_mode()  # its outputs leave as numpy arrays: none can reach autograd (about 5% faster)
def evaluate(
    model,
    class_tokens: torch.Tensor,
    bank,
    labels: np.ndarray,
    tau: float,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    autocast=None,
    features: torch.Tensor | None = None,
    log_probs: bool = False,
) -> Predictions:
    """Evaluate ``model`` (a HeadedCLIP) on every image of ``bank``; the text side is computed once.
    ``features`` (from :func:`image_features` of a model with the same image tower) replace the image pass;
    ``log_probs`` keeps every image's class log-probabilities (N x C) as well."""
    d = dist_context()
    n = len(labels)
    was_training = model.training
    model.eval()
    try:
        ctx = autocast if autocast is not None else contextlib.nullcontext
        with ctx():
            text = model.class_text_features(class_tokens.to(device))
        preds, losses, margins, lps = [], [], [], []
        # class image towers read the images even where the shared tower's features are cached
        need_images = features is None or bool(model.class_towers)
        for idx, images in _batches(bank, n, batch_size, None if need_images else features):
            y = torch.as_tensor(labels[idx], device=device)
            towers = {}
            with ctx():
                if images is not None:
                    images = images.to(device, non_blocking=True)
                    towers = {c: f.float() for c, f in model.encode_tower_images(images).items()}
                if features is not None:
                    feats = features[torch.as_tensor(idx)].to(device, non_blocking=True)
                else:
                    feats = model.encode_image(images)
            logits, loss, margin = logits_losses(feats.float(), text.float(), y, tau, model.decision_bias, towers)
            preds.append(logits.argmax(1).cpu())
            losses.append(loss.cpu())
            margins.append(margin.float().cpu())
            if log_probs:
                lps.append(F.log_softmax(logits.float(), 1).cpu())
    finally:
        model.train(was_training)
    # under torchrun each rank evaluated its contiguous shard; the gather trims the padding, so every
    # rank holds exactly one prediction per image
    cat = lambda xs, dt: d.gather_numpy(torch.cat(xs).numpy().astype(dt) if xs else np.zeros(0, dt), n)  # noqa: E731
    lp = None
    if log_probs:  # (rows, C) even on a rank without rows, so that the gather's shapes agree
        lp = d.gather_numpy(torch.cat(lps).numpy() if lps else np.zeros((0, text.shape[0]), np.float32), n)
    return Predictions(
        labels=np.asarray(labels, dtype=np.int64),
        preds=cat(preds, np.int64),
        losses=cat(losses, np.float32),
        margins=cat(margins, np.float32),
        log_probs=lp,
    )


def _load_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False))


def _map_tensor(path: Path) -> torch.Tensor:
    """The stored array mapped, not read: its pages come in as the batches reach them (a split's images are
    tens of MB, and a verify whose predictions are all cached reads none of them). Copy-on-write, so the
    tensor is writable and the file is never changed; entries are replaced by rename, never rewritten in
    place, so a mapping always sees the entry it opened."""
    return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))


def _dump_tensor(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return buf.getvalue()


#: A split's decoded images are cached when they take at most this many bytes (the demo's 4,000 held-out
#: images: 49 MB; the same split at 224 px would be 2.4 GB, and is decoded each time instead).
IMAGE_CACHE_BYTES = 512 << 20


def images_key(data_digest: str, preprocess: Mapping[str, Any]) -> str:
    """What decides a split's decoded images: its digest (every file's bytes, in order), the model's
    preprocessing, and the libraries that decode and resize."""
    import PIL
    import torchvision

    return PredictionCache.key(
        data=data_digest,
        preprocess=dict(preprocess),
        pillow=PIL.__version__,
        torchvision=torchvision.__version__,
        torch=torch.__version__,
        v=1,
    )


def default_cache_dir() -> Path:
    return cache_root()


class PredictionCache:
    """Disk cache of :class:`Predictions`, keyed by everything that determines them.

    Keys are digests (model weights, manifest + files, prompts, tau), so a changed input can never be
    served a stale answer, and files are written atomically so an interrupt cannot leave half a cache.
    """

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / "predictions" / f"{key}.npz"

    def features_path(self, key: str) -> Path:
        return self.root / "features" / f"{key}.npy"

    def get_or_compute(self, key: str, compute) -> Predictions:
        """The cached predictions, or ``compute()``'s (then stored)."""
        return self._cached(self.path(key), Predictions.from_npz, lambda p: p.to_npz_bytes(), compute)

    def images_path(self, key: str) -> Path:
        return self.root / "images" / f"{key}.npy"

    def features(self, key: str, compute) -> torch.Tensor:
        """Cached image features (N, D), or ``compute()``'s (then stored)."""
        return self._cached(self.features_path(key), _load_tensor, _dump_tensor, compute)

    def images(self, key: str, n: int) -> torch.Tensor | None:
        """A split's ``n`` decoded images stored under ``key`` (:func:`images_key`), or None: a missing,
        unreadable or misshapen entry is decoded again, never trusted."""
        path = self.images_path(key)
        try:
            out = _map_tensor(path) if path.exists() else None
        except Exception:
            out = None
        if out is not None and (out.dim() < 2 or out.shape[0] != n or not out.is_floating_point()):
            out = None
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out

    def put_images(self, key: str, images: torch.Tensor) -> None:
        """Store a split's decoded images; a cache that cannot be written (read-only, full) only costs the
        next verify the decoding."""
        try:
            atomic_write_bytes(self.images_path(key), _dump_tensor(images))
        except OSError:
            pass

    def _cached(self, path: Path, load, dump, compute):
        """Under torchrun rank 0 looks and broadcasts what it found, so every rank takes the same path
        through the collective computation; a corrupt entry is recomputed, never trusted."""
        d = dist_context()
        out = None
        if d.is_main and path.exists():
            try:
                out = load(path)
            except Exception:
                out = None
        out = d.broadcast_object(out)
        if out is not None:
            self.hits += 1
            return out
        self.misses += 1
        out = compute()
        if d.is_main:
            try:
                atomic_write_bytes(path, dump(out))
            except OSError:
                pass  # a cache that cannot be written (read-only, full) only costs the next run the work
        return out


def prediction_key(
    model_digest: str,
    data_digest: str,
    classes: Sequence[str],
    templates: Sequence[str],
    tau: float,
    heads: bool,
    log_probs: bool = False,
) -> str:
    extra = {"log_probs": True} if log_probs else {}  # keys of existing caches stay as they were
    return PredictionCache.key(
        model=model_digest,
        data=data_digest,
        classes=list(classes),
        templates=list(templates),
        tau=tau,
        heads=heads,
        v=1,
        **extra,
    )
