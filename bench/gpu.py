"""The one prepared GPU check (issue: speed and scale): ViT-B/16 at 224 px, a 256-image target batch plus a
class-balanced protected batch, the penalty method's step against a bare forward+backward of the same
batches with the same model and optimizer, in bf16 autocast; and the same step under CUDA's sync-debug
mode set to "error", which fails on any host-device synchronisation in the hot loop.

No weights are downloaded (the device machine has no network): the model is randomly initialised, which
costs the same per step as a pretrained one. Synthetic images: the data path is not what is measured.

    python -m bench.gpu [--arch ViT-B-16] [--target-batch 256] [--classes 6] [--out bench/results/gpu.json]

Runs on a CPU too (small sizes; the test suite does so) so that the script is known to work before a
GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from .overhead import (
    _bare_step,
    _draw_batches,
    _environment,
    _interleaved,
    _ratio,
    _summary,
    _synthetic_data,
    synthetic_plan,
)


def run(
    *,
    arch: str = "ViT-B-16",
    target_batch: int = 256,
    classes: int = 6,
    per_class: int = 26,
    images_per_class: int = 64,
    precision: str = "bf16",
    warmup: int = 5,
    rounds: int = 4,
    per_round: int = 10,
    device: str | None = None,
) -> dict:
    from safespec.evaluate import PredictionCache
    from safespec.model import create_model, model_autocast
    from safespec.train import Trainer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        precision = "fp32"  # bf16 autocast is the GPU option; on a CPU the check only proves the script runs
    n_prot = classes - 1
    plan = synthetic_plan(
        n_prot, arch=arch, classes_per_step=min(n_prot, 5), per_class=per_class, target_batch=target_batch
    )
    plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, device=str(dev), precision=precision))
    loaded = create_model(arch, plan.classes, heads=True, rank=plan.model.rank, seed=0, device=dev, precision=precision)
    size = loaded.model.clip.visual.image_size
    shape = (3, *((size, size) if isinstance(size, int) else size))
    data = _synthetic_data(plan, shape, images_per_class, target_batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(plan, loaded, data, method="penalty", cache=PredictionCache(Path(tmp)), quiet=True)
    bare_model = copy.deepcopy(trainer.model)
    o = plan.optimizer
    opt = torch.optim.AdamW(
        [p for p in bare_model.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay, fused=True
    )
    bare = _bare_step(
        bare_model,
        opt,
        trainer.class_tokens,
        _draw_batches(plan, data, 8, dev),
        lambda: model_autocast(dev, precision),
        o.constraint_tau,
        dev,
    )
    ms = {
        k: _summary(v)
        for k, v in _interleaved(
            {"bare": bare, "penalty": trainer.train_step}, warmup=warmup, rounds=rounds, per_round=per_round, device=dev
        ).items()
    }
    syncs = None
    if dev.type == "cuda":  # any synchronisation inside a step raises here
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                trainer.train_step()
            syncs = "none"
        except RuntimeError as e:  # name the line of safespec that synchronised, not only the error
            import traceback

            ours = [f for f in traceback.extract_tb(e.__traceback__) if "safespec" in f.filename]
            where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}: {ours[-1].line}" if ours else ""
            syncs = str(e).splitlines()[0] + where
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "arch": arch,
        "image_size": list(shape[1:]),
        "precision": precision,
        "batch": {"target": target_batch, "protected_classes": min(n_prot, 5), "per_class": per_class},
        "step_ms": ms,
        "ratio": {"penalty": _ratio(ms["penalty"], ms["bare"])},
        "host_syncs_in_step": syncs,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        **_environment(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--target-batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=6, help="classes of the task (one target, the rest protected)")
    ap.add_argument("--per-class", type=int, default=26)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu.json")
    a = ap.parse_args(argv)
    res = run(arch=a.arch, target_batch=a.target_batch, classes=a.classes, per_class=a.per_class)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    json.dump(res, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
