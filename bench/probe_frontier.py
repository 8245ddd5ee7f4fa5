"""A target probe over v1's frozen features, judged by the frontier on the tuning world (issue 12, session 14).

The question: is the tower's frontier limited by how much it can learn, or by what it learns from? A probe
adds a learned correction to the target's cosine, ``cos_t(x) + g(phi(x))``, with ``phi`` v1's frozen image
features (the projected embedding and the final block's class token and patch mean) and ``g`` linear,
trained full-batch with every other class's logit fixed at v1's. It moves only decisions into and out of the
target, as ``model.target_tower`` does, at a fraction of the capacity. Three sources of negatives:

- ``store``: what a cycle has, the protected store (v1's own training data, which v1 fits) and its fixed
  augmented views, beside the target set;
- ``unfitted K``: K held-out images per protected class in place of the store (images v1 never fitted);
- ``oracle``: half the held-out split, target images included, as the whole training set.

Each is judged on the other half of the held-out split (the even rows), against v1 with only its target
offset moved, at the best held-out-chosen offset per flip level (``selection_replay.frontier``'s view).
The tuning world only: its held-out split is the tuning judge.

    python -m bench.probe_frontier [--levels 1 2 5 7]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.selection_replay import net_flips_and_gain
from bench.worlds import REPO, build, spec_for

OUT = REPO / "out" / "probe"
TAU = 0.05  # the demo spec's temperature: logits are cosines / TAU
OFFSETS = np.arange(-0.3, 0.5, 0.002)  # target offsets in cosine units


def features(path: Path = OUT / "features.npz") -> dict[str, np.ndarray]:
    """v1's frozen features of every split of the tuning world (cached in ``path``)."""
    if path.exists():
        return dict(np.load(path))
    import torch
    import torch.nn.functional as F

    from safespec.api import load_inputs, load_model, load_split, make_train_data
    from safespec.model.headed import build_class_tokens

    torch.set_num_threads(2)
    world = build("tuning", quiet=True)
    inp = load_inputs(spec_for(world, out_dir=OUT / "spec"), log=lambda s: None)
    old = load_model(inp.plan.model, inp.plan.classes)
    model = old.model.eval()
    data = make_train_data(inp, old.preprocess)
    held = load_split(inp.manifests["heldout"], old.preprocess, inp.digests["heldout"])
    visual = model.clip.visual
    seen: dict[str, torch.Tensor] = {}
    hook = visual.ln_post.register_forward_hook(lambda mod, i, o: seen.__setitem__("post", o))
    out: dict[str, np.ndarray] = {"target": np.array(inp.plan.classes.index(world.config.target))}
    try:
        with torch.no_grad():
            out["text"] = model.class_text_features(
                build_class_tokens(old.tokenizer, inp.plan.classes, inp.plan.templates)
            ).numpy()
            for name, split in (("store", data.store), ("train", data.target), ("held", held)):
                emb, tok = [], []
                for i in range(0, len(split.bank), 500):
                    x = split.bank[np.arange(i, min(i + 500, len(split.bank)))]
                    emb.append(F.normalize(visual(x), dim=-1).numpy())
                    post = seen["post"] if seen["post"].shape[0] == x.shape[0] else seen["post"].transpose(0, 1)
                    tok.append(torch.cat([post[:, 0], post[:, 1:].mean(1)], 1).numpy())
                out[f"{name}_emb"], out[f"{name}_tok"] = np.concatenate(emb), np.concatenate(tok)
                out[f"{name}_y"] = np.asarray(split.labels)
    finally:
        hook.remove()
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def frontier(cos_new: np.ndarray, cos_old: np.ndarray, y: np.ndarray, t: int, levels: Sequence[int]) -> dict:
    """At each level w: the best target gain among offsets where no protected class loses more than w net
    images (a net negative flip count, as the certificate sees it)."""
    from safespec.certify.selection import margins

    old_ok = margins(cos_old, y) > 0
    best = dict.fromkeys(levels, 0.0)
    for off in OFFSETS:
        net, gain = net_flips_and_gain(old_ok, margins(cos_new, y, t, float(off)) > 0, y, t)
        for w in levels:
            if net <= w:
                best[w] = max(best[w], gain)
    return best


def train_probe(train: tuple[np.ndarray, ...], t: int, *, steps: int = 400, seed: int = 0):
    """Fit ``g`` (linear, zero at the start: the probe starts as v1) on (cosines, features, labels, row
    weights) by full-batch AdamW on the softmax cross-entropy with only the target's logit free; returns a
    function from (cosines, features) to corrected cosines."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    cos, feat, y, w = (torch.as_tensor(a) for a in train)
    mu, sd = feat.mean(0), feat.std(0) + 1e-6
    g = torch.nn.Linear(feat.shape[1], 1)
    torch.nn.init.zeros_(g.weight)
    torch.nn.init.zeros_(g.bias)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2, weight_decay=0.01)

    def corrected(c: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        z = c.clone()
        z[:, t] = z[:, t] + g((f - mu) / sd).squeeze(1)
        return z

    for _ in range(steps):
        opt.zero_grad()
        loss = (F.cross_entropy(corrected(cos, feat) / TAU, y.long(), reduction="none") * w).sum() / w.sum()
        loss.backward()
        opt.step()

    def apply(c: np.ndarray, f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return corrected(torch.as_tensor(c), torch.as_tensor(f)).numpy()

    return apply


def study(d: dict[str, np.ndarray], levels: Sequence[int] = (1, 2, 5, 7)) -> list[tuple[str, dict]]:
    """The frontier of each probe and of v1's offset alone, judged on the held-out split's even rows."""
    t = int(d["target"])

    def part(name: str, rows=slice(None)):
        cos = d[f"{name}_emb"][rows] @ d["text"].T
        return cos, np.concatenate([d[f"{name}_emb"], d[f"{name}_tok"]], 1)[rows], d[f"{name}_y"][rows]

    idx = np.arange(len(d["held_y"]))
    judge = part("held", idx % 2 == 0)
    spare = part("held", idx % 2 == 1)
    train, store = part("train"), part("store")
    rows = [("v1, target offset only", frontier(judge[0], judge[0], judge[2], t, levels))]

    def probe(name: str, negatives: tuple[np.ndarray, ...]) -> None:
        """The target set and ``negatives`` weighted to equal totals, then the negatives times 1 and 4."""
        cat = [np.concatenate([train[i], negatives[i]]) for i in range(3)]
        for lam in (1.0, 4.0):
            w = np.concatenate(
                [np.full(len(train[2]), 1 / len(train[2])), np.full(len(negatives[2]), lam / len(negatives[2]))]
            )
            apply = train_probe((*cat, w.astype(np.float32)), t)
            rows.append(
                (f"{name}, negatives x{lam:g}", frontier(apply(judge[0], judge[1]), judge[0], judge[2], t, levels))
            )

    probe("probe: target set + the store (what a cycle has)", store)
    for k in (100, 500):
        pick = np.concatenate([np.flatnonzero(spare[2] == c)[:k] for c in np.unique(spare[2]) if c != t])
        probe(f"probe: target set + {k} unfitted negatives per class", tuple(a[pick] for a in spare))
    rows.append(
        (
            "probe, oracle: trained on the held-out odd rows (500 targets among them)",
            frontier(
                train_probe((*spare, np.ones(len(spare[2]), np.float32)), t)(judge[0], judge[1]),
                judge[0],
                judge[2],
                t,
                levels,
            ),
        )
    )
    return rows


def table(rows: list[tuple[str, dict]]) -> str:
    levels = list(rows[0][1])
    lines = [
        "| readout | " + " | ".join(f"gain at <= {w} net flips / 500" for w in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    lines += [f"| {name} | " + " | ".join(f"{r[w]:+.3f}" for w in levels) + " |" for name, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_frontier", description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 5, 7])
    args = ap.parse_args(argv)
    print(table(study(features(), args.levels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
