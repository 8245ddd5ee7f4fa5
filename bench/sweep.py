"""A sweep of method variants on the demo world, with held-out traces (exploration, not a measurement of
the shipped spec: `bench.quality` is that).

For every variant (spec overrides, bench/sweep-variants.json) and seed: train from v1, and at every
validation also evaluate the held-out split, and both splits under every offset of the target's logit
on a grid. So one sweep answers, offline, what any selection rule over (checkpoint, offset) would have
chosen on validation and what that choice gives on held-out (``--analyse``). The variants are written
out in full against specs/demo.yaml; offsets are scored here, so each variant runs with the trainer's own
calibration off. One JSON line per run goes to ``--out`` as soon as it finishes; runs go to a pool of
processes (one per 2 cores; on a GPU machine they share the GPU).

    python -m bench.sweep bench/sweep-variants.json [--workers 6] [--deadline 420] [--seeds 0 1 2] [--out FILE]
    python -m bench.sweep --analyse FILE [--max-drop 0.01]

bench/RESULTS.md ("Status") gives what the sweep on an H200 found; the traces are not committed.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: Offsets of the target's logit tried at every validation, in logit units at temperature 0.05.
OFFSETS = [round(float(b), 2) for b in np.linspace(-8, 8, 33)]
G: dict = {}  # one worker's loaded inputs


def init(spec):
    """Load the world, v1 and its predictions once per worker process."""
    import torch

    torch.set_num_threads(2)
    from safespec.api import load_inputs, load_split, make_train_data
    from safespec.evaluate import PredictionCache, evaluate
    from safespec.model import build_class_tokens, load_model

    inp = load_inputs(Path(spec), log=lambda s: None)
    plan = inp.plan
    old = load_model(plan.model, plan.classes)
    dev = next(old.model.parameters()).device
    data = make_train_data(inp, old.preprocess)
    held = load_split(inp.manifests["heldout"], old.preprocess, inp.digests["heldout"])
    tokens = build_class_tokens(old.tokenizer, plan.classes, plan.templates).to(dev)
    p_old = evaluate(old.model, tokens, held.bank, held.labels, 0.05, device=dev)
    val = data.validation
    p_old_val = evaluate(old.model, tokens, val.bank, val.labels, 0.05, device=dev)
    G.update(
        p_old_val=p_old_val,
        inp=inp,
        plan=plan,
        old=old,
        data=data,
        held=held,
        tokens=tokens,
        p_old=p_old,
        dev=dev,
        cache=PredictionCache(),
    )


def curve(lp, y, p_old, t, flips=True):
    """Per offset of the target's logit: [offset, target change, worst protected change, per-class changes
    (, per-class flips old-right-new-wrong / old-wrong-new-right)] against the old model, unshifted."""
    C = lp.shape[1]
    a0 = p_old.per_class_accuracy(C)
    prot = [i for i in range(C) if i != t]
    out = []
    for b in OFFSETS:
        z = lp.copy()
        z[:, t] += b
        pred = z.argmax(1)
        a = np.array([(pred[y == c] == c).mean() for c in range(C)])
        d = a - a0
        row = [b, round(float(d[t]), 4), round(float(d[prot].min()), 4), [round(float(x), 4) for x in d]]
        if flips:
            oc, nc = p_old.preds == y, pred == y
            row.append([[int((oc & ~nc)[y == c].sum()), int((~oc & nc)[y == c].sum())] for c in range(C)])
        out.append(row)
    return out


def job(name, ov, seed):
    """One fine-tune of one variant and seed, traced on held-out at every validation."""
    import torch

    from bench.quality import _row
    from safespec.certify import certify
    from safespec.evaluate import evaluate
    from safespec.train import Trainer

    plan0, old, held, tokens, p_old, dev = (G[k] for k in ("plan", "old", "held", "tokens", "p_old", "dev"))
    C, t = len(plan0.classes), plan0.objective.target_index
    acc_old = p_old.per_class_accuracy(C)
    ov = dict(ov)
    metric, slack = ov.pop("metric", None), ov.pop("slack", None)
    freeze = ov.pop("freeze", None)
    try:  # a key names an optimizer setting as the plan does: `lr`, `penalty.beta`
        o = plan0.optimizer.updated({**ov, "seed": seed})
    except KeyError as e:
        raise ValueError(f"variant {name!r}: {e.args[0]}") from None
    plan = dataclasses.replace(plan0, optimizer=o)
    if metric or slack is not None:
        plan = dataclasses.replace(
            plan,
            constraints=tuple(
                dataclasses.replace(c, metric=metric or c.metric, slack=c.slack if slack is None else slack)
                for c in plan.constraints
            ),
        )
    if freeze is not None:
        plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, freeze=tuple(freeze)))
    torch.manual_seed(seed)
    trainee = dataclasses.replace(old, model=copy.deepcopy(old.model))
    trace = []

    class T(Trainer):
        def validate(self):
            v = super().validate()
            if self.step > 0:
                p = evaluate(
                    self.model, tokens, held.bank, held.labels, 0.05, device=dev, autocast=self.autocast, log_probs=True
                )
                d = p.per_class_accuracy(C) - acc_old
                prot = [i for i in range(C) if i != t]
                val = self.data.validation
                pv = evaluate(
                    self.model, tokens, val.bank, val.labels, 0.05, device=dev, autocast=self.autocast, log_probs=True
                )
                trace.append(
                    {
                        "step": self.step,
                        "dog": round(float(d[t]), 4),
                        "min": round(float(d[prot].min()), 4),
                        "feasible": v["feasible"],
                        "val_dog": round(float(v["accuracy"][t]), 4),
                        "val_curve": curve(pv.log_probs, val.labels, G["p_old_val"], t),
                        "held_curve": curve(p.log_probs, held.labels, p_old, t, flips=False),
                    }
                )
            return v

    t0 = time.perf_counter()
    outcome = T(plan, trainee, G["data"], method=o.method, cache=G["cache"], quiet=True).run()
    trainee.model.load_state_dict(outcome.state_dict)
    p_new = evaluate(trainee.model, tokens, held.bank, held.labels, 0.05, device=dev)
    cert = certify(plan, held.labels, p_old.preds, p_new.preds)
    n_cert = sum(c["status"] == "certified" for c in cert.to_dict()["capabilities"])
    row = _row(
        o.method,
        seed,
        plan.classes,
        t,
        acc_old,
        p_new.per_class_accuracy(C),
        n_cert,
        round(time.perf_counter() - t0, 1),
        {"selected_step": outcome.selected_step},
    )
    row.update(
        variant=name, overrides=ov | {"metric": metric, "slack": slack, "freeze": freeze}, trace=trace, target_index=t
    )
    return row


def analyse(path: Path, max_drop: float = 0.01, budget: float = 0.03) -> list[str]:
    """Per variant and seed: the (checkpoint, offset) with the best validation target accuracy among those
    whose every protected class drops by at most ``max_drop`` on validation (ties: the offset nearest 0),
    and its held-out target gain and worst protected change."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = collections.defaultdict(list)
    for r in rows:
        if "trace" in r:
            by[r["variant"]].append(r)
    out = []
    for v, rs in by.items():
        picks = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            best = None
            for tr in r["trace"]:
                held = {x[0]: x for x in tr["held_curve"]}
                for b, dog, _worst, per, _ in tr["val_curve"]:
                    # (traces written before target_index was recorded are the demo's: dog is class 4)
                    prot = [d for i, d in enumerate(per) if i != r.get("target_index", 4)]
                    if min(prot) >= -max_drop - 1e-9 and (
                        best is None or dog > best[0] + 1e-9 or (abs(dog - best[0]) < 1e-9 and abs(b) < abs(best[2]))
                    ):
                        best = (dog, tr["step"], b, held[b][1], held[b][2])
            picks.append(best)
        bar = all(p is not None and p[4] >= -budget - 1e-9 and p[3] >= 0.15 for p in picks)
        cells = " | ".join(
            "v1" if p is None else f"step {p[1]} b{p[2]:+.1f}: {p[3]:+.3f} / {100 * p[4]:+.2f} pt" for p in picks
        )
        out.append(f"{v:28s} {cells}{'   <- bar' if bar else ''}")
    return out


def main(argv=None) -> None:
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="?", type=Path)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new run starts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep.jsonl")
    ap.add_argument("--analyse", type=Path)
    ap.add_argument("--max-drop", type=float, default=0.01)
    a = ap.parse_args(argv)
    if a.analyse:
        print("\n".join(analyse(a.analyse, a.max_drop)))
        return
    if a.variants is None:
        ap.error("give a variants file or --analyse FILE")
    variants = json.loads(a.variants.read_text())
    deadline = time.time() + a.deadline
    a.out.parent.mkdir(parents=True, exist_ok=True)
    spec = str(ROOT / "specs" / "demo.yaml")
    init(spec)  # the old model's references, cached once before the workers start
    G.clear()
    with ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn"), initializer=init, initargs=(spec,)) as ex:
        todo = [(n, ov, s) for n, ov in variants for s in a.seeds]
        running = {}
        while todo or running:
            while todo and len(running) < a.workers * 2 and time.time() < deadline:
                n, ov, s = todo.pop(0)
                running[ex.submit(job, n, ov, s)] = (n, s)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                n, s = running.pop(f)
                try:
                    r = f.result()
                except Exception as e:
                    r = {"variant": n, "seed": s, "error": repr(e)}
                with a.out.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
                print(
                    f"{n} seed {s}: "
                    + (
                        r["error"]
                        if "error" in r
                        else f"selected step {r['selected_step']}: dog {r['target_new'] - r['target_old']:+.3f}, "
                        f"worst {100 * r['min_change']:+.2f} pt ({r['seconds']} s)"
                    ),
                    flush=True,
                )
            if time.time() > deadline and todo:
                print(f"deadline: {len(todo)} runs not started", flush=True)
                todo = []


if __name__ == "__main__":
    main()
