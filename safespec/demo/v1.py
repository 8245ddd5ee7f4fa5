"""The old model v1 of a world: trained from scratch on the world's base-train split, deterministically."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageBank, Manifest, file_digest
from ..model import ZeroShotClassifier, create_model, save_checkpoint
from ..progress import Progress
from .config import WorldConfig, _label, _show


# ------------------------------------------------------------------------------------------ v1
def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_v1(
    out: Path,
    base: Manifest,
    heldout: Manifest,
    config: WorldConfig,
    *,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train v1 from scratch on base-train with the zero-shot objective (CE over cosine/tau logits against
    every class's prompt embedding; both towers learn), save it headless, and measure it on held-out."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        return _train_v1(out, base, heldout, config, progress=progress, log=log)
    finally:
        torch.set_num_threads(before)


def _train_v1(
    out: Path, base: Manifest, heldout: Manifest, config: WorldConfig, *, progress: bool, log: Callable[[str], Any]
) -> dict[str, Any]:
    # lazy: open_clip is imported only when a world is actually built, not when a built one is reused
    torch.manual_seed(config.seed)
    loaded = create_model(config.arch, config.classes, heads=False, seed=config.seed, device="cpu")
    model = loaded.model
    bank = ImageBank(base, loaded.preprocess, preload=True)
    labels = torch.as_tensor(base.labels)
    clf = ZeroShotClassifier(model, loaded.tokenizer, config.templates, tau=config.tau)
    tokens = clf.class_tokens

    frozen = [p for n, p in model.named_parameters() if n.endswith("token_embedding.weight")]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.warmup_steps, config.steps))
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(len(bank)), 0
    bs = min(config.batch_size, len(bank))
    model.train()
    t0 = time.perf_counter()
    loss_avg = float("nan")
    with Progress(config.steps, "world: training v1", quiet=not progress, bar=_show(progress), log=log) as bar:
        for step in range(config.steps):
            if cursor + bs > len(order):
                order, cursor = rng.permutation(len(bank)), 0
            idx = order[cursor : cursor + bs]
            cursor += bs
            img = model.encode_image(bank[idx])
            txt = model.class_text_features(tokens)
            loss = F.cross_entropy(img @ txt.T / config.tau, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_avg = loss.item() if step == 0 else 0.9 * loss_avg + 0.1 * loss.item()
            bar.update(1, status=f"loss {loss_avg:.3f}")
    seconds = time.perf_counter() - t0
    for p in frozen:
        p.requires_grad_(True)
    model.eval()

    heldout_acc = evaluate_accuracy(loaded, heldout, config.templates, tau=config.tau)
    path = out / "models" / "v1.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = save_checkpoint(
        model,
        path,
        metadata={
            "what": f"safespec {_label(config)} v1 (old model), trained from scratch on base-train",
            "steps": config.steps,
            "seed": config.seed,
            "base_digest": base.digest(),
        },
    )
    log(f"{_label(config)}: v1 held-out accuracy " + ", ".join(f"{c} {a:.2f}" for c, a in heldout_acc.items()))
    return {
        "path": "models/v1.safetensors",
        "arch": config.arch,
        "digest": digest,
        "file_sha256": "sha256:" + file_digest(path),
        "heads": False,
        "steps": config.steps,
        "train_seconds": round(seconds, 1),
        "final_loss": round(loss_avg, 4),
        "heldout_accuracy": heldout_acc,
        "heldout_mean_accuracy": round(float(np.mean(list(heldout_acc.values()))), 4),
    }


def evaluate_accuracy(
    loaded,
    manifest: Manifest,
    templates: Sequence[str] = ("a photo of a {}.",),
    *,
    tau: float = 0.05,
    batch_size: int = 256,
    bank: ImageBank | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy per class of ``loaded`` (a :class:`safespec.model.LoadedModel`) on ``manifest``;
    classes without images are left out."""
    bank = bank if bank is not None else ImageBank(manifest, loaded.preprocess)
    clf = ZeroShotClassifier(loaded.model, loaded.tokenizer, templates, tau=tau)
    pred = clf.predict_batches(x for _, x in bank.iter_batches(batch_size)).predictions.numpy()
    y = manifest.labels
    return {c: round(float((pred[y == k] == k).mean()), 4) for k, c in enumerate(manifest.classes) if (y == k).any()}
