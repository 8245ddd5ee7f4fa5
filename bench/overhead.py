"""What safespec costs on top of the model passes it cannot avoid (issue 6, section 1).

Three measurements, each a ratio of two timings taken in the same process, interleaved so that a change
in machine load falls on both sides alike:

- ``steps``: one constrained training step (``Trainer.train_step``, penalty and lagrangian) over a bare
  step on the same batches with the same model and optimizer: encode the target and protected images and
  the class prompts, cross-entropy of the cosine logits, backward, fused AdamW step, zero_grad.
  Goal: <= 1.10.
- ``verify``: images/s of ``safespec verify`` (``runner.verify_candidate``, end to end, with the old
  model's held-out predictions and the decoded held-out images already cached, as for every verify after
  the first on a split) over images/s of a bare inference loop over the same held-out images with the
  same model (class text features precomputed), once reading the image files and once over decoded
  images. Goal: >= 0.9. The images each verify encodes are counted, to show that the second one
  evaluates only the candidate.
- ``scaling``: the penalty step with 5, 50 and 365 protected classes at the same per-step batch, on
  synthetic images. Goal: 365/5 <= 1.1. The class prompts go through the text tower every step, so the
  forward+backward of ``class_text_features`` is timed alone too: it is what grows with the classes.

    python -m bench.overhead [--quick] [--only steps verify scaling]   # prints JSON
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "specs" / "demo.yaml"
GOALS = {"steps": 1.10, "verify": 0.9, "scaling": 1.1}


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, rounds: int, per_round: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall time (s) of every call, in alternating blocks of ``per_round`` calls of each function (the
    order rotating per round), so that load from other processes, which only ever adds time, is spread
    over every function rather than landing on whichever ran last."""
    for f in fns.values():
        for _ in range(warmup):
            f()
        _sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(per_round):
                t = time.perf_counter()
                fns[k]()
                _sync(device)
                times[k].append(time.perf_counter() - t)
    return times


def _summary(ts: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(ts), 3), "min_ms": round(1000 * min(ts), 3), "n": len(ts)}


def _ratio(a: dict, b: dict) -> dict:
    return {"median": round(a["median_ms"] / b["median_ms"], 3), "min": round(a["min_ms"] / b["min_ms"], 3)}


@contextlib.contextmanager
def _count_encoded_images():
    """Count the images that go through ``HeadedCLIP.encode_image`` (every evaluation and training pass
    does), so that a test of caching can say how many images were really evaluated."""
    from safespec.model import HeadedCLIP

    counter = {"images": 0}
    original = HeadedCLIP.encode_image

    @functools.wraps(original)
    def counted(self, images, *a, **kw):
        counter["images"] += int(images.shape[0])
        return original(self, images, *a, **kw)

    HeadedCLIP.encode_image = counted
    try:
        yield counter
    finally:
        HeadedCLIP.encode_image = original


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _environment() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ steps
def _bare_step(model, opt, class_tokens, batches, autocast, tau: float, device) -> Callable[[], None]:
    """The floor of a training step: the passes over the same images and prompts that any fine-tuning
    of this model's trainable weights needs, and nothing safespec adds (no sampler, constraints,
    multipliers, scheduler). A frozen tower's outputs are computed once, as any fine-tune would cache
    them; a class image tower (``model.target_tower``) reads the images every step."""
    from safespec.model import class_logits

    trains = lambda ps: any(p.requires_grad for p in ps)  # noqa: E731
    image_trains = trains(model.clip.visual.parameters())
    text_trains = trains(p for n, p in model.clip.named_parameters() if not n.startswith("visual."))
    text_trains = text_trains or (model.heads is not None and trains(model.heads.parameters()))
    ready = []
    with torch.no_grad(), autocast():
        fixed_text = None if text_trains else model.class_text_features(class_tokens).float()
        for x_parts, y in batches:
            x = torch.cat([bank[rows] for bank, rows in x_parts]).to(device, non_blocking=True)
            ready.append((x, None if image_trains else model.encode_image(x).float(), y))
    it = itertools.cycle(ready)

    def step():
        x, shared, y = next(it)
        with autocast():
            text = fixed_text if fixed_text is not None else model.class_text_features(class_tokens)
            feats = shared if shared is not None else model.encode_image(x)
            towers = {c: f.float() for c, f in model.encode_tower_images(x).items()}
        loss = F.cross_entropy(class_logits(feats.float(), text.float(), tau, towers=towers), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _draw_batches(plan, data, n: int, device) -> list:
    """``n`` target+protected batches drawn as the trainer draws them (same samplers, same sizes), with
    their labels as tensors, so that the bare step indexes the banks but samples nothing."""
    from safespec.data import ProtectedSampler, TargetSampler

    o = plan.optimizer
    protected = sorted({i for c in plan.constraints for i in c.class_indices})
    ps = ProtectedSampler(data.store.labels, protected, o.batch.protected_classes, o.batch.per_class, seed=o.seed)
    ts = TargetSampler(
        data.target.labels, plan.objective.target_index, o.batch.target, o.batch.positive_fraction, seed=o.seed + 1
    )
    out = []
    for _ in range(n):
        pos, neg = ts.sample()
        t_rows = np.concatenate([pos, neg])
        p_rows, _ = ps.sample()
        y = torch.as_tensor(np.concatenate([data.target.labels[t_rows], data.store.labels[p_rows]]), device=device)
        out.append((((data.target.bank, t_rows), (data.store.bank, p_rows)), y))
    return out


def _trainers(plan, old, data, methods, cache) -> dict:
    from safespec.train import Trainer

    out = {}
    for m in methods:
        p = dataclasses.replace(plan, optimizer=dataclasses.replace(plan.optimizer, method=m))
        trainee = dataclasses.replace(old, model=copy.deepcopy(old.model))
        out[m] = Trainer(p, trainee, data, method=m, cache=cache, quiet=True)
    return out


def _bare_for(trainer, plan, data, *, n_batches: int = 32):
    """A bare step on a copy of ``trainer``'s model (frozen towers as the trainer froze them) with a fused
    AdamW built as the trainer builds its own."""
    from safespec.model import model_autocast

    model = copy.deepcopy(trainer.model)
    o = plan.optimizer
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay, fused=True
    )
    device = trainer.device
    step = _bare_step(
        model,
        opt,
        trainer.class_tokens,
        _draw_batches(plan, data, n_batches, device),
        functools.partial(model_autocast, device, plan.model.precision),
        plan.optimizer.constraint_tau,
        device,
    )
    return step, opt.defaults == trainer.opt.defaults


def step_overhead(
    spec_path: Path = DEMO_SPEC,
    *,
    warmup: int = 10,
    rounds: int = 10,
    per_round: int = 20,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Constrained step / bare step on the spec's data, model, batch sizes and optimizer settings."""
    from safespec.api import load_inputs, make_train_data
    from safespec.evaluate import PredictionCache
    from safespec.model import load_model

    env = _environment()
    inp = load_inputs(spec_path, log=log)
    plan = inp.plan
    old = load_model(plan.model, plan.classes)
    data = make_train_data(inp, old.preprocess)
    with tempfile.TemporaryDirectory() as tmp:  # the old model's references, without touching the user's cache
        trainers = _trainers(plan, old, data, ("penalty", "lagrangian"), PredictionCache(Path(tmp)))
    bare, same_opt = _bare_for(trainers["penalty"], plan, data)
    fns = {"bare": bare, **{m: tr.train_step for m, tr in trainers.items()}}
    log(f"steps: timing {list(fns)} ({warmup} warm-up, {rounds} x {per_round} steps each)")
    ms = {
        k: _summary(v)
        for k, v in _interleaved(
            fns, warmup=warmup, rounds=rounds, per_round=per_round, device=trainers["penalty"].device
        ).items()
    }
    o = plan.optimizer
    return {
        "spec": shown(spec_path),
        "arch": plan.model.arch,
        "classes": len(plan.classes),
        "constraints": len(plan.constraints),
        "batch": {
            "target": o.batch.target,
            "protected_classes": o.batch.protected_classes,
            "per_class": o.batch.per_class,
        },
        "optimizer_matches_trainer": same_opt,
        "step_ms": ms,
        "ratio": {m: _ratio(ms[m], ms["bare"]) for m in trainers},
        **env,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ verify
def _perturbed_candidate(old, path: Path, seed: int) -> str:
    """Save a copy of the old model (heads included) whose weights differ slightly, so that its digest,
    and so its cache key, differs from the old model's: verify must evaluate it, at the old model's cost."""
    from safespec.model import save_checkpoint

    model = copy.deepcopy(old.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-4)
    return save_checkpoint(model, path, {"bench": "perturbed copy of the old model"})


def _bare_inference(model, class_tokens, bank, tau: float, autocast, device, batch_size: int = 256):
    """The floor of certification: one pass of the model over the decoded held-out images, logits against
    class text features computed beforehand, the predicted class per image."""
    with torch.no_grad(), autocast():
        text = model.class_text_features(class_tokens).float()

    def loop():
        preds = []
        with torch.no_grad():
            for _, images in bank.iter_batches(batch_size):
                with autocast():
                    feats = model.encode_image(images.to(device, non_blocking=True))
                preds.append((feats.float() @ text.T / tau).argmax(1).cpu())
        return torch.cat(preds)

    return loop


def verify_throughput(
    spec_path: Path = DEMO_SPEC,
    *,
    candidates: int = 5,  # verifies with the old model cached: best of 5, as the bare loop is
    bare_repeats: int = 5,
    cli: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """``safespec verify`` against a bare inference loop, both over the spec's held-out split.

    The first verify (candidate 0) fills an empty prediction cache with the old model's held-out outputs;
    each later candidate then finds the old model cached, and its wall time, end to end (spec and manifest
    checks, image decoding, both models loaded, the candidate evaluated, certificate, report), gives verify's
    images/s. A last verify of an already verified candidate finds both cached. These run in this process,
    where the image-file digests are memoised after the first call; ``cli`` also times one
    ``safespec verify`` process (old model cached), which pays for its imports and every file digest."""
    from safespec.api import load_inputs, verify_candidate
    from safespec.data import ImageBank, decode_workers
    from safespec.model import build_class_tokens, load_model, model_autocast

    env = _environment()
    inp = load_inputs(spec_path, log=log)
    plan = inp.plan
    old = load_model(plan.model, plan.classes)
    device = next(old.model.parameters()).device
    runs, cli_run = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [tmp / f"candidate-{i}.safetensors" for i in range(candidates + 1 + cli)]
        for i, p in enumerate(paths):
            _perturbed_candidate(old, p, seed=i)
        # every candidate once (the first fills the cache with the old model), then the last one again
        last = candidates
        for i, p in [*enumerate(paths[: last + 1]), (last, paths[last])]:
            events: list[tuple[float, str]] = []
            t0 = time.perf_counter()
            with _count_encoded_images() as counter:
                res = verify_candidate(
                    spec_path,
                    p,
                    out=tmp / f"run-{len(runs)}",
                    cache_dir=tmp / "cache",
                    command="bench verify",
                    log=lambda s, events=events, t0=t0: events.append((round(time.perf_counter() - t0, 3), s)),
                )
            wall = time.perf_counter() - t0
            runs.append(
                {
                    "candidate": i,
                    "seconds": round(wall, 3),
                    "images_encoded": counter["images"],
                    "verdict": res["verdict"],
                    "log": events,
                }
            )
            log(f"verify candidate {i}: {wall:.2f} s, {counter['images']} images encoded")
        if cli:
            cmd = [
                sys.executable,
                "-m",
                "safespec",
                "verify",
                str(Path(spec_path).resolve()),
                "--candidate",
                str(paths[-1]),
                "--quiet",
                "--out",
                str(tmp / "run-cli"),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env={**os.environ, "SAFESPEC_CACHE_DIR": str(tmp / "cache")},
                capture_output=True,
                text=True,
            )
            cli_run = {
                "seconds": round(time.perf_counter() - t0, 3),
                "exit_code": proc.returncode,
                "stderr_tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode not in (0, 1) else [],
            }
            log(f"verify CLI: {cli_run['seconds']:.2f} s, exit code {proc.returncode}")
        t = time.perf_counter()
        load_inputs(spec_path, log=log)
        load_inputs_s = time.perf_counter() - t
        held_manifest = inp.manifests["heldout"]
        n = len(held_manifest)
        t = time.perf_counter()
        bank = ImageBank(held_manifest, old.preprocess, num_workers=decode_workers())  # decoded as verify decodes
        decode_s = time.perf_counter() - t
        cand = load_model(dataclasses.replace(plan.model, pretrained=None, checkpoint=str(paths[1])), plan.classes)
    cand.model.eval()  # as evaluate() runs it
    tokens = build_class_tokens(cand.tokenizer, plan.classes, plan.templates).to(device)
    autocast = functools.partial(model_autocast, device, plan.model.precision)
    loop = _bare_inference(cand.model, tokens, bank, plan.optimizer.constraint_tau, autocast, device)

    def loop_with_decode():  # the same loop, reading the image files first, as verify must
        fresh = ImageBank(held_manifest, old.preprocess, num_workers=decode_workers())
        return _bare_inference(cand.model, tokens, fresh, plan.optimizer.constraint_tau, autocast, device)()

    timed = _interleaved(
        {"bare": loop, "bare_with_decode": loop_with_decode}, warmup=1, rounds=bare_repeats, per_round=1, device=device
    )
    bare, bare_decode = _summary(timed["bare"]), _summary(timed["bare_with_decode"])
    cold, warm_old, both_cached = runs[0], runs[1:-1], runs[-1]
    best = min(warm_old, key=lambda r: r["seconds"])
    bare_s, bare_decode_s = bare["min_ms"] / 1000, bare_decode["min_ms"] / 1000
    return {
        "spec": shown(spec_path),
        "heldout_images": n,
        "arch": plan.model.arch,
        "verify_seconds": {
            "cold_cache": cold["seconds"],
            "old_model_cached": [r["seconds"] for r in warm_old],
            "both_cached": both_cached["seconds"],
        },
        "images_encoded": {
            "cold_cache": cold["images_encoded"],
            "old_model_cached": [r["images_encoded"] for r in warm_old],
            "both_cached": both_cached["images_encoded"],
        },
        "second_verify_evaluates_only_candidate": all(r["images_encoded"] == n for r in warm_old),
        "cli_old_model_cached": cli_run,
        "verify_log_of_fastest": best["log"],
        "bare_loop_ms": bare,
        "bare_loop_with_decode_ms": bare_decode,
        # the fastest verify with the old model cached, split into parts timed alone (in this process)
        "phases_s": {
            "load_inputs of a spec read before (manifests re-checked, digests remembered)": round(load_inputs_s, 3),
            "a verify with both predictions cached (all but the candidate's inference)": both_cached["seconds"],
            "inference (bare loop)": round(bare_s, 3),
            "the candidate's evaluation beyond the bare loop": round(
                best["seconds"] - both_cached["seconds"] - bare_s, 3
            ),
            "decoding the held-out images (what the image cache saves)": round(decode_s, 3),
        },
        "images_per_s": {
            "verify": round(n / best["seconds"], 1),
            "bare": round(n / bare_s, 1),
            "bare_with_decode": round(n / bare_decode_s, 1),
            **({"verify_cli": round(n / cli_run["seconds"], 1)} if cli_run else {}),
        },
        "ratio": {
            "verify_over_bare": round(bare_s / best["seconds"], 4),
            "verify_over_bare_with_decode": round(bare_decode_s / best["seconds"], 4),
            **({"verify_cli_over_bare": round(bare_s / cli_run["seconds"], 4)} if cli_run else {}),
        },
        **env,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ scaling
class SyntheticBank:
    """Random images in memory, with the interface ``Split.bank`` needs (``bank[rows]``, ``iter_batches``,
    ``len``), so that hundreds of classes cost no files."""

    def __init__(self, n: int, shape: tuple[int, ...], seed: int):
        self.tensor = torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.tensor.index_select(0, torch.as_tensor(np.asarray(idx, dtype=np.int64)))

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else min(stop, len(self))
        for s in range(start, stop, batch_size):
            idx = np.arange(s, min(s + batch_size, stop), dtype=np.int64)
            yield idx, self[idx]


def synthetic_plan(
    n_protected: int,
    *,
    arch: str,
    classes_per_step: int,
    per_class: int,
    target_batch: int,
    rank: int = 8,
    freeze: tuple[str, ...] = (),
):
    """A plan with ``n_protected`` protected classes (each its own constraint, as in the demo) plus one
    target, the demo's optimizer settings otherwise."""
    from safespec.plan import compile_spec
    from safespec.spec import Spec

    names = [f"class{i:03d}" for i in range(n_protected)] + ["target"]
    spec = {
        "safespec": 1,
        "name": f"scaling-{n_protected}",
        # the weights come from create_model, never from this file: a spec needs to name one
        "model": {
            "arch": arch,
            "checkpoint": "random-init.safetensors",
            "heads": {"enabled": True, "rank": rank},
            "device": "cpu",
            "freeze": list(freeze),
        },
        "classes": {"names": names},
        "data": {k: f"{k}.csv" for k in ("protected", "target", "validation", "heldout")},
        "protect": [{"classes": "others", "each": True, "tolerance": 0.03}],
        "target": {"class": "target", "goal": {"min_improvement": 0.1}},
        "optimize": {
            "method": "penalty",
            "objective": "ce",
            "steps": 1000,
            "warmup_steps": 10,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "lr": 3e-5,
            "batch": {"target": target_batch, "protected_classes": classes_per_step, "per_class": per_class},
        },
    }
    return compile_spec(Spec.model_validate(spec))


def _synthetic_data(plan, shape, images_per_class: int, target_batch: int, seed: int):
    from safespec.train import Split, TrainData

    n_prot = len(plan.classes) - 1
    t = plan.objective.target_index
    rng = np.random.default_rng(seed)
    store_labels = np.repeat(np.arange(n_prot), images_per_class)
    target_labels = np.concatenate([np.full(target_batch, t), rng.integers(0, n_prot, target_batch)])
    val_labels = np.arange(len(plan.classes))  # one image per class: the trainer's reference needs a split
    tag = f"synthetic-{n_prot}"

    def split(labels, name, s):
        return Split(bank=SyntheticBank(len(labels), shape, seed + s), labels=labels, digest=f"{tag}-{name}")

    return TrainData(
        store=split(store_labels, "store", 1),
        target=split(target_labels, "target", 2),
        validation=split(val_labels, "validation", 3),
    )


def _prompt_tokens(trainer) -> str:
    """How many prompt tokens a step encodes: the prompt tree's nodes against the padded token matrix."""
    prompts = trainer._prompts(0, trainer.prompt_tokens.shape[0])
    padded = trainer.prompt_tokens.numel()
    return f"{prompts.nodes} / {padded}" if hasattr(prompts, "nodes") else f"{padded} / {padded}"


def _text_side(trainer, *, warmup: int, rounds: int, per_round: int) -> dict:
    """Forward+backward of the class prompts alone, encoded as a step encodes them (a prompt tree where
    the text tower allows one); gradients are cleared after each call so the trainer's next step starts
    clean."""
    model, classes = trainer.model, len(trainer.plan.classes)
    prompts = trainer._prompts(0, trainer.prompt_tokens.shape[0])

    def fb():
        model.pool_templates(model.encode_text(prompts, trainer.prompt_heads), classes).sum().backward()
        model.zero_grad(set_to_none=True)

    return _summary(
        _interleaved({"text": fb}, warmup=warmup, rounds=rounds, per_round=per_round, device=trainer.device)["text"]
    )


def _attention_floor(block, y, tree, rows):
    """The prompt tree's attention with its mixing taken out: the same q/k/v and output projections, each
    node reading only its own value. Not a model; the cost of the text side that no exact attention over
    the same nodes can go below (the matrix products of every node through every block)."""
    attn = block.attn
    width = y.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    k, v = F.linear(y, w[width:], b[width:]).chunk(2, -1)
    q = F.linear(y if rows is None else y[rows], w[:width], b[:width])
    return attn.out_proj(q + (k + v if rows is None else (k + v)[rows]))


def _text_floor(trainer, **timing) -> dict | None:
    """:func:`_text_side` with the tree's attention replaced by :func:`_attention_floor` (None where the
    step encodes no tree)."""
    from safespec.model import prompt_tree

    if not hasattr(trainer._prompts(0, trainer.prompt_tokens.shape[0]), "nodes"):
        return None
    real = prompt_tree._attention
    prompt_tree._attention = _attention_floor
    try:
        return _text_side(trainer, **timing)
    finally:
        prompt_tree._attention = real


def scaling(
    counts=(5, 50, 365),
    *,
    arch: str = "safespec-tiny-vit",
    classes_per_step: int = 5,
    per_class: int = 10,
    target_batch: int = 64,
    images_per_class: int = 10,
    warmup: int = 5,
    rounds: int = 6,
    per_round: int = 10,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Penalty step time against the number of protected classes, the per-step batch held fixed: with
    every tower trained (each step encodes every class's prompts, so the text side grows with the
    classes) and with the text tower frozen (its prompt features cached; a step runs only the heads)."""
    env = _environment()
    out = {}
    for variant, freeze in (("all_trained", ()), ("text_frozen", ("text",))):
        out[variant] = _scaling(
            counts,
            freeze=freeze,
            arch=arch,
            classes_per_step=classes_per_step,
            per_class=per_class,
            target_batch=target_batch,
            images_per_class=images_per_class,
            warmup=warmup,
            rounds=rounds,
            per_round=per_round,
            log=log,
        )
    return {
        "variants": out,
        "ratio": out["all_trained"]["ratio"],
        "ratio_text_frozen": out["text_frozen"]["ratio"],
        **env,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _scaling(
    counts, *, freeze, arch, classes_per_step, per_class, target_batch, images_per_class, warmup, rounds, per_round, log
) -> dict:
    from safespec.evaluate import PredictionCache
    from safespec.model import create_model
    from safespec.train import Trainer

    env = _environment()
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            plan = synthetic_plan(
                n,
                arch=arch,
                classes_per_step=classes_per_step,
                per_class=per_class,
                target_batch=target_batch,
                freeze=freeze,
            )
            loaded = create_model(arch, plan.classes, heads=True, rank=plan.model.rank, seed=0)
            size = loaded.model.clip.visual.image_size
            shape = (3, *((size, size) if isinstance(size, int) else size))
            data = _synthetic_data(plan, shape, images_per_class, target_batch, seed=n)
            trainers[n] = Trainer(plan, loaded, data, method="penalty", cache=PredictionCache(Path(tmp)), quiet=True)
    log(f"scaling: timing penalty steps with {list(counts)} protected classes (frozen: {list(freeze) or 'none'})")
    device = trainers[counts[0]].device
    steps = _interleaved(
        {str(n): tr.train_step for n, tr in trainers.items()},
        warmup=warmup,
        rounds=rounds,
        per_round=per_round,
        device=device,
    )
    step_ms = {k: _summary(v) for k, v in steps.items()}
    text_ms = (
        {
            str(n): _text_side(tr, warmup=2, rounds=max(2, rounds // 2), per_round=per_round)
            for n, tr in trainers.items()
        }
        if not freeze
        else None
    )
    lo, hi = str(counts[0]), str(counts[-1])
    floor = None
    if text_ms:
        t = _text_floor(trainers[counts[-1]], warmup=2, rounds=max(2, rounds // 2), per_round=per_round)
        if t is not None:
            bound = step_ms[lo]["median_ms"] + t["median_ms"] - text_ms[lo]["median_ms"]
            floor = {"text_ms": t, "step_ms": round(bound, 3), "ratio": round(bound / step_ms[lo]["median_ms"], 3)}
    return {
        "arch": arch,
        "protected_classes": list(counts),
        "batch": {"target": target_batch, "protected_classes": classes_per_step, "per_class": per_class},
        "images": f"synthetic, {shape[1]}x{shape[2]}",
        "step_ms": step_ms,
        "class_text_forward_backward_ms": text_ms,
        "ratio": {f"{hi}_over_{lo}": _ratio(step_ms[hi], step_ms[lo])},
        "text_share_of_step": {k: round(text_ms[k]["median_ms"] / step_ms[k]["median_ms"], 3) for k in step_ms}
        if text_ms
        else None,
        "prompt_tokens": {str(n): _prompt_tokens(tr) for n, tr in trainers.items()} if text_ms else None,
        "attention_floor": floor,
        **env,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ frozen towers
def frozen_towers(
    spec_path: Path = DEMO_SPEC,
    *,
    warmup: int = 5,
    rounds: int = 6,
    per_round: int = 10,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """The demo's penalty step with every tower trained, with ``freeze: [image]`` run the slow way (the
    frozen tower still encodes each batch, without gradients) and the fast way (its features cached once),
    and with ``freeze: [image, text]`` (cached image features and prompt features: a step runs the heads)."""
    from safespec.api import load_inputs, make_train_data
    from safespec.evaluate import PredictionCache
    from safespec.model import load_model
    from safespec.train import Trainer

    env = _environment()
    inp = load_inputs(spec_path, log=log)
    base = dataclasses.replace(inp.plan, optimizer=dataclasses.replace(inp.plan.optimizer, method="penalty"))
    old = load_model(base.model, base.classes)
    data = make_train_data(inp, old.preprocess)
    fns, setup_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = PredictionCache(Path(tmp))
        for name, freeze, cached in (
            ("all trained", (), False),
            ("image frozen, encoded every step", ("image",), False),
            ("image frozen, features cached", ("image",), True),
            ("image and text frozen, cached", ("image", "text"), True),
        ):
            plan = dataclasses.replace(base, model=dataclasses.replace(base.model, freeze=freeze))
            trainee = dataclasses.replace(old, model=copy.deepcopy(old.model))
            t0 = time.perf_counter()
            tr = Trainer(plan, trainee, data, method="penalty", cache=cache, quiet=True)
            setup_s[name] = round(time.perf_counter() - t0, 2)
            if not cached:  # the frozen tower runs each step, as it would without the cache
                tr.image_frozen, tr.text_frozen = False, False
                tr.prompt_inputs, tr.caption_inputs = tr.prompt_tokens, tr.caption_tokens
            fns[name] = tr.train_step
    log(f"frozen: timing {list(fns)}")
    ms = {
        k: _summary(v)
        for k, v in _interleaved(
            fns, warmup=warmup, rounds=rounds, per_round=per_round, device=next(old.model.parameters()).device
        ).items()
    }
    slow = ms["image frozen, encoded every step"]
    return {
        "spec": shown(spec_path),
        "arch": base.model.arch,
        "step_ms": ms,
        "trainer_setup_s_with_an_empty_cache": setup_s,
        "speedup": {k: round(slow["median_ms"] / v["median_ms"], 2) for k, v in ms.items()},
        **env,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ report
def goals(section: str, r: dict) -> list[tuple[str, float, str, bool]]:
    """(measure, value, goal, met) rows of one section; ratios are judged on the median."""
    if section == "steps":
        return [
            (f"{m} step / bare step", v["median"], f"<= {GOALS['steps']}", v["median"] <= GOALS["steps"])
            for m, v in r["ratio"].items()
        ]
    if section == "verify":
        # the measure: a bare loop that reads the image files. A verify after the first on a split
        # reads the decoded images from its cache instead, so the like-for-like measure, a bare loop over
        # decoded images, is kept beside it with the same goal
        v = r["ratio"]["verify_over_bare_with_decode"]
        strict = r["ratio"]["verify_over_bare"]
        return [
            (
                "verify images/s / bare inference (decode + model) images/s",
                v,
                f">= {GOALS['verify']}",
                v >= GOALS["verify"],
            ),
            (
                "verify images/s / bare inference over decoded images (neither decodes) images/s",
                strict,
                f">= {GOALS['verify']}",
                strict >= GOALS["verify"],
            ),
            (
                "second verify evaluates only the candidate",
                r["second_verify_evaluates_only_candidate"],
                "true",
                bool(r["second_verify_evaluates_only_candidate"]),
            ),
        ]
    if section == "frozen":
        return []  # a speed-up to report, with no goal of its own
    if section == "scaling":
        rows = []
        for variant, what in (("all_trained", "every tower trained"), ("text_frozen", "text tower frozen")):
            ((k, v),) = r["variants"][variant]["ratio"].items()
            hi, lo = k.split("_over_")
            rows.append(
                (
                    f"penalty step, {hi} / {lo} protected classes, {what}",
                    v["median"],
                    f"<= {GOALS['scaling']}",
                    v["median"] <= GOALS["scaling"],
                )
            )
        return rows
    raise KeyError(section)


def markdown(section: str, r: dict) -> str:
    """The section's table for bench/RESULTS.md."""
    if section == "steps":
        b = r["batch"]
        lines = [
            f"{r['spec']} ({r['arch']}, {r['classes']} classes, {r['constraints']} constraints), batch: "
            f"{b['target']} target + {b['protected_classes']} x {b['per_class']} protected images; "
            f"{r['torch_threads']} torch threads, load average {r['load_average_before'][0]} before, "
            f"{r['load_average_after'][0]} after. Optimizer built as the trainer's: "
            f"{r['optimizer_matches_trainer']}.",
            "",
            "| step | median ms | min ms | steps timed | ratio (median) | ratio (min) |",
            "|---|---|---|---|---|---|",
        ]
        for k, s in r["step_ms"].items():
            ratio = r["ratio"].get(k, {"median": 1.0, "min": 1.0})
            lines.append(f"| {k} | {s['median_ms']} | {s['min_ms']} | {s['n']} | {ratio['median']} | {ratio['min']} |")
        return "\n".join(lines)
    if section == "verify":
        s, e, ips, cli = r["verify_seconds"], r["images_encoded"], r["images_per_s"], r["cli_old_model_cached"]
        lines = [
            f"{r['spec']} ({r['arch']}), {r['heldout_images']} held-out images; {r['torch_threads']} torch "
            f"threads, load average {r['load_average_before'][0]} before, {r['load_average_after'][0]} after.",
            "",
            "| run | wall s | images encoded |",
            "|---|---|---|",
            f"| verify_candidate, empty cache (old + candidate) | {s['cold_cache']} | {e['cold_cache']} |",
        ]
        lines += [
            f"| verify_candidate, old model and held-out images cached | {t} | {n} |"
            for t, n in zip(s["old_model_cached"], e["old_model_cached"])
        ]
        lines.append(f"| verify_candidate, both cached | {s['both_cached']} | {e['both_cached']} |")
        if cli:
            lines.append(
                f"| `safespec verify` process, old model cached (exit code {cli['exit_code']}) | {cli['seconds']} | |"
            )
        lines += [
            f"| bare inference loop over decoded images (best of {r['bare_loop_ms']['n']}) "
            f"| {r['bare_loop_ms']['min_ms'] / 1000:.3f} | {r['heldout_images']} |",
            f"| bare inference loop, reading the image files (best of {r['bare_loop_with_decode_ms']['n']}) "
            f"| {r['bare_loop_with_decode_ms']['min_ms'] / 1000:.3f} | {r['heldout_images']} |",
            "",
            "images/s: "
            + ", ".join(f"{k} {v}" for k, v in ips.items())
            + "; ratios: "
            + ", ".join(f"{k} {v}" for k, v in r["ratio"].items())
            + ".",
            "",
            "The fastest verify with the old model cached, in parts timed alone (s): "
            + "; ".join(f"{k} {v}" for k, v in r["phases_s"].items())
            + ". Its log lines (s since the call):",
            "",
        ]
        lines += [f"- {t:.2f} s: {msg}" for t, msg in r["verify_log_of_fastest"]]
        if cli and cli["stderr_tail"]:
            lines += ["", "The verify process failed:", "", "```", *cli["stderr_tail"], "```"]
        return "\n".join(lines)
    if section == "scaling":
        v0 = r["variants"]["all_trained"]
        b = v0["batch"]
        lines = [
            f"{v0['arch']}, {v0['images']}, batch: {b['target']} target + {b['protected_classes']} x "
            f"{b['per_class']} protected images, penalty method; {r['torch_threads']} torch threads, load "
            f"average {r['load_average_before'][0]} before, {r['load_average_after'][0]} after.",
            "",
            "| towers | protected classes | step median ms | step min ms | class prompts fwd+bwd median ms "
            "| text share of step | prompt tokens encoded (tree nodes / padded tokens) |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant, v in r["variants"].items():
            for k, st in v["step_ms"].items():
                text = v["class_text_forward_backward_ms"]
                lines.append(
                    f"| {variant.replace('_', ' ')} | {k} | {st['median_ms']} | {st['min_ms']} | "
                    f"{text[k]['median_ms'] if text else '(cached)'} | "
                    f"{v['text_share_of_step'][k] if text else ''} | "
                    f"{v['prompt_tokens'][k] if text and v.get('prompt_tokens') else ''} |"
                )
        f = v0.get("attention_floor")
        if f:
            hi = str(v0["protected_classes"][-1])
            lo = str(v0["protected_classes"][0])
            lines += [
                "",
                f"The floor with every tower trained: the {hi}-class prompt tree with its attention's mixing taken "
                f"out (the same projections, each node reading its own value; not a model) costs "
                f"{f['text_ms']['median_ms']} ms forward+backward against the tree's "
                f"{v0['class_text_forward_backward_ms'][hi]['median_ms']}. A {hi}-class step with any exact "
                f"attention over those nodes costs at least the {lo}-class step plus that text side less the "
                f"{lo}-class one: {f['step_ms']} ms, **{f['ratio']}x** the {lo}-class step (the matrix products "
                "of every prefix token through every block; the wider logits and the heads come on top).",
            ]
        return "\n".join(lines)
    if section == "frozen":
        lines = [
            f"{r['spec']} ({r['arch']}), penalty steps; {r['torch_threads']} torch threads, load average "
            f"{r['load_average_before'][0]} before, {r['load_average_after'][0]} after. Speed-up: against "
            "the frozen image tower encoding every batch.",
            "",
            "| towers | step median ms | step min ms | speed-up | trainer set-up s (empty cache) |",
            "|---|---|---|---|---|",
        ]
        for k, st in r["step_ms"].items():
            lines.append(
                f"| {k} | {st['median_ms']} | {st['min_ms']} | {r['speedup'][k]} | "
                f"{r['trainer_setup_s_with_an_empty_cache'][k]} |"
            )
        return "\n".join(lines)
    raise KeyError(section)


SECTIONS = ("steps", "verify", "scaling", "frozen")


def run(sections=SECTIONS, *, quick: bool = False, spec_path: Path = DEMO_SPEC, log=lambda s: None) -> dict:
    """The selected sections' results; ``quick`` times few steps (a smoke run of the harness)."""
    out = {}
    for s in sections:
        if s == "steps":
            kw = dict(warmup=3, rounds=3, per_round=5) if quick else {}
            out[s] = step_overhead(spec_path, log=log, **kw)
        elif s == "verify":
            kw = dict(candidates=1, bare_repeats=2) if quick else {}
            out[s] = verify_throughput(spec_path, log=log, **kw)
        elif s == "scaling":
            kw = dict(warmup=2, rounds=3, per_round=3) if quick else {}
            out[s] = scaling(log=log, **kw)
        elif s == "frozen":
            kw = dict(warmup=2, rounds=2, per_round=3) if quick else {}
            out[s] = frozen_towers(spec_path, log=log, **kw)
        else:
            raise KeyError(s)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke run, not a measurement")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--spec", type=Path, default=DEMO_SPEC)
    a = ap.parse_args(argv)
    res = run(a.only, quick=a.quick, spec_path=a.spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
