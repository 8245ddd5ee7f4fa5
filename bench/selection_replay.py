"""Selection rules replayed on the tuning world: one training run per seed, every candidate's validation and
held-out predictions recorded, then any selection rule judged offline in milliseconds.

The tuning world's held-out split (1,000 images per class) is the tuning judge, so it may be looked at here;
the demo and second worlds' may not (bench/RESULTS.md). A replay also emulates the worlds safespec is judged
on but never sees: fewer validation images per class (a fixed subsample) and a certificate on 200 held-out
images per class (the first 200 of each class), the rest judging the gain.

    python -m bench.selection_replay record [--seeds 0 1 2]    # trains, writes out/replay/s{seed}.npz
    python -m bench.selection_replay table [--val 60 50] [--heldout 400 200] [--q 0.8 0.9] [--goal 0.1]
    python -m bench.selection_replay frontier --tags "" lr2          # what training variants make possible
    python -m bench.selection_replay frontier --readouts last v1 mean3 gate   # ensembles, a gate, v1 alone
    python -m bench.selection_replay table --rules target per-rival --q 0.8 0.95 0.99
    python -m bench.selection_replay split-frontier                  # one target offset or one per rival class
    python -m bench.selection_replay calibration                     # selection's predictions against outcomes
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.worlds import REPO, build, spec_for
from safespec.certify.selection import rival_offsets

OUT = REPO / "out" / "replay"


def record(seeds: list[int], settings: dict[str, Any] | None = None, tag: str = "") -> None:
    import torch

    from bench.quality import set_dotted
    from safespec.api import load_split, run_cycle
    from safespec.data.manifests import read_manifest
    from safespec.train import trainer as trainer_mod

    torch.set_num_threads(2)
    world = build("tuning", quiet=True)
    base = yaml.safe_load(spec_for(world, out_dir=OUT / "spec").read_text())
    for k, v in (settings or {}).items():
        set_dotted(base, k, v)
    classes = base["classes"]["names"]
    held_manifest = read_manifest(Path(world.manifests["heldout"]), classes)
    original = trainer_mod.Trainer.validate
    trace: list[dict[str, Any]] = []

    def validate(self):  # the trainer's own evaluation, plus the held-out split's predictions of the same model
        v = original(self)
        if not hasattr(self, "_replay_heldout"):
            self._replay_heldout = load_split(held_manifest, self.loaded.preprocess, "replay")
        val = self._evaluate(self.data.validation, log_probs=True) if self.step > 0 else self.ref_val
        held = self._evaluate(self._replay_heldout, log_probs=True)
        trace.append(
            {"step": self.step, "val": val.log_probs.astype(np.float32), "held": held.log_probs.astype(np.float32)}
        )
        return v

    trainer_mod.Trainer.validate = validate
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            trace.clear()
            spec = copy.deepcopy(base)
            spec["optimize"]["seed"] = seed
            spec["report"]["dir"] = str(OUT / f"run{tag}-s{seed}")
            path = OUT / f"spec{tag}-s{seed}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            run_cycle(path, quiet=True, log=lambda s: None, command="bench.selection_replay")
            steps = [t["step"] for t in trace]
            np.savez_compressed(
                OUT / f"s{seed}{tag}.npz",
                steps=np.array(steps),
                val=np.stack([t["val"] for t in trace]),
                held=np.stack([t["held"] for t in trace]),
                val_labels=read_manifest(Path(world.manifests["validation"]), classes).labels,
                held_labels=held_manifest.labels,
                target=classes.index(base["target"]["class"]),
                tau=float(base["optimize"].get("temperature", 0.05)),
            )
            print(f"seed {seed}: {len(steps)} candidates recorded", file=sys.stderr, flush=True)
    finally:
        trainer_mod.Trainer.validate = original


# ------------------------------------------------------------------------------------------ judging
TOL, CONF, GOAL = 0.03, 0.95, 0.10  # the demo spec's, as spec_for copies them
RULES = ("target", "release", "per-rival")  # choose()'s selection rules


def _per_class_rows(labels: np.ndarray, take: slice) -> np.ndarray:
    """Row indices: ``take`` of each class's rows, in manifest order."""
    return np.concatenate([np.flatnonzero(labels == c)[take] for c in np.unique(labels)])


def goal_probability(sel, logits: np.ndarray, offset: float, goal: float, heldout_n: int) -> float:
    """A rejected rule's half (the 'release' rows): the predicted chance that the held-out target gain
    reaches ``goal``, from the target's validation margins through the selector's kernel, the validation
    estimate's spread and the held-out draw's both counted (a normal approximation)."""
    from scipy.stats import norm

    from safespec.certify.selection import margins

    t = sel.target_mask
    new = norm.cdf(margins(logits[t], sel.labels[t], sel.target, offset) / sel.target_bandwidth)
    old = norm.cdf(margins(sel.old[t], sel.labels[t]) / sel.target_bandwidth)
    d = new - old
    gain, n = float(d.mean()), int(t.sum())
    pb, pc = float(np.clip(d, 0, None).mean()), float(np.clip(-d, 0, None).mean())
    var = float(d.var(ddof=1)) / n + max(pb + pc - gain * gain, 0.0) / heldout_n
    mean = gain - goal + 0.5 / heldout_n
    return float(mean >= 0) if var <= 0 else float(norm.cdf(mean / np.sqrt(var)))


def _release_offset(sel, logits: np.ndarray, goal: float, heldout_n: int) -> float:
    """The admissible offset with the best chance of a release (goal met and all certified), among the
    points selection itself tries; of equal chances, the one with more target images right."""
    best, best_p = 0.0, -1.0
    for b in sel.offset_points(logits)[::-1]:
        p = sel.probability(logits, float(b))
        if p >= sel.q:
            r = p * goal_probability(sel, logits, float(b), goal, heldout_n)
            if r > best_p:
                best, best_p = float(b), r
    return best


def choose(sel, val: np.ndarray, objective: str, goal: float = GOAL, heldout_n: int = 400) -> tuple[int, Any]:
    """The candidate (index into the trace, offset) a rule selects. 'target' is safespec's rule
    (safespec.train.candidates: the best validation target among admissible candidates); 'release', tried
    and not adopted, takes the admissible candidate most likely to be a release; 'per-rival' is 'target'
    with each candidate's offset grown per rival class (optimize.calibrate.target_offset: per-rival,
    ``Selector.grow_rival_offsets``), and returns the offsets as a vector."""
    a0 = sel.assess(val[0], calibrate=False)
    best: tuple[int, Any] = (0, 0.0)
    if objective == "per-rival":
        best = (0, np.zeros(val.shape[-1]))
        key = (a0.target_accuracy, a0.target_smooth)
        for k in range(1, len(val)):
            a = sel.assess(val[k], calibrate=True, rivals=True)
            if a.admissible and (a.target_accuracy, a.target_smooth) > key:
                best, key = (k, np.array(a.rival_offsets)), (a.target_accuracy, a.target_smooth)
        return best
    if objective == "target":
        key = (a0.target_accuracy, a0.target_smooth)
        for k in range(1, len(val)):
            a = sel.assess(val[k], calibrate=True)
            if a.admissible and (a.target_accuracy, a.target_smooth) > key:
                best, key = (k, a.offset), (a.target_accuracy, a.target_smooth)
        return best
    rkey = None
    for k in range(1, len(val)):
        off = _release_offset(sel, val[k], goal, heldout_n)
        p = sel.probability(val[k], off)
        acc = sel.target_accuracy(val[k], off)
        if p < sel.q or acc <= a0.target_accuracy:
            continue
        r = (p * goal_probability(sel, val[k], off, goal, heldout_n), acc, sel.target_smooth(val[k], off))
        if rkey is None or r > rkey:
            best, rkey = (k, off), r
    return best


def judge(d: dict, k: int, offset: Any, rows: np.ndarray, goal: float = GOAL) -> dict[str, Any]:
    """The certificate on held-out ``rows`` and the gain over the whole held-out split."""
    from safespec.certify.selection import margins
    from safespec.certify.stats import certifies

    y, t = d["held_labels"], int(d["target"])
    old_ok = margins(d["held"][0], y) > 0
    if np.ndim(offset):  # one offset per rival class
        new_ok = margins(rival_offsets(d["held"][k], t, offset), y) > 0
    else:
        new_ok = margins(d["held"][k], y, t, float(offset)) > 0
    out = {"certified": 0, "caps": 0, "violated_true": 0, "worst_true": 0.0}
    for c in np.unique(y):
        if c == t:
            continue
        r = rows[y[rows] == c]
        b = int((old_ok[r] & ~new_ok[r]).sum())
        cpos = int((~old_ok[r] & new_ok[r]).sum())
        ok = certifies(b, cpos, len(r), TOL, CONF)
        allc = y == c
        true_drop = float(old_ok[allc].mean() - new_ok[allc].mean())
        out["caps"] += 1
        out["certified"] += ok
        out["violated_true"] += ok and true_drop > TOL
        out["worst_true"] = max(out["worst_true"], true_drop)
    rt = rows[y[rows] == t]
    gain_run = float(new_ok[rt].sum() - old_ok[rt].sum())
    out["goal"] = gain_run >= goal * len(rt) - 1e-9
    allt = y == t
    out["gain"] = float(new_ok[allt].mean() - old_ok[allt].mean())
    out["exit0"] = out["goal"] and out["certified"] == out["caps"]
    return out


def table(
    seeds: list[int],
    vals: list[int],
    helds: list[int],
    qs: list[float],
    tag: str = "",
    goal: float = GOAL,
    rules: tuple[str, ...] = ("target", "release"),
) -> str:
    from safespec.certify.selection import Capability, Selector

    lines = [
        "| validation / class | held-out / class | rule | min P | exit 0 | all certified | goal met | gain (1,000) | "
        "certified yet truly > tol | worst true drop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    data = {s: dict(np.load(OUT / f"s{s}{tag}.npz")) for s in seeds}
    for V in vals:
        for H in helds:
            for objective in rules:
                for q in qs:
                    res = []
                    for s, d in data.items():
                        yv, t = d["val_labels"], int(d["target"])
                        caps = [Capability(str(c), (int(c),), TOL, CONF, H) for c in np.unique(yv) if c != t]
                        for draw in range(3 if V < 60 else 1):
                            rng = np.random.default_rng(1000 * s + draw)
                            vrows = np.concatenate(
                                [np.sort(rng.permutation(np.flatnonzero(yv == c))[:V]) for c in np.unique(yv)]
                            )
                            sel = Selector(d["val"][0][vrows], yv[vrows], caps, t, q)
                            k, off = choose(sel, d["val"][:, vrows], objective, goal, H)
                            for chunk in range(1000 // H if H <= 500 else 1):
                                rows = _per_class_rows(d["held_labels"], slice(chunk * H, (chunk + 1) * H))
                                res.append(judge(d, k, off, rows, goal))
                    n = len(res)
                    lines.append(
                        f"| {V} | {H} | {objective} | {q} | {sum(r['exit0'] for r in res)}/{n} | "
                        f"{sum(r['certified'] == r['caps'] for r in res)}/{n} | {sum(r['goal'] for r in res)}/{n} | "
                        f"{np.mean([r['gain'] for r in res]):+.3f} | {sum(r['violated_true'] for r in res)} | "
                        f"{max(r['worst_true'] for r in res):.3f} |"
                    )
    return "\n".join(lines)


def net_flips_and_gain(old_ok: np.ndarray, new_ok: np.ndarray, y: np.ndarray, t: int) -> tuple[int, float]:
    """The worst protected class's net negative flips (what its certificate counts) and the target's
    accuracy gain, from each image's old and new correctness."""
    net = max(int((old_ok & ~new_ok)[y == c].sum() - (~old_ok & new_ok)[y == c].sum()) for c in np.unique(y) if c != t)
    return net, float(new_ok[y == t].mean() - old_ok[y == t].mean())


#: The frontier's readouts of a recorded run: the last checkpoint; v1 itself (only its target offset moves:
#: the yardstick a cycle must beat); the mean of the last k checkpoints' log-probabilities (a logit
#: ensemble, the best case of averaging the tower's weights); and the last checkpoint behind a
#: backward-compatible gate (Traeuble et al. 2021): v1's prediction is kept where the new model says target,
#: v1 does not, and v1's own top-1 margin exceeds g, g a second dimension of the search (GATES).
READOUTS = ("last", "v1", "mean2", "mean3", "mean4", "mean-all", "gate")
GATES = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)


def _readout(d: dict, name: str) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """The held-out log-probabilities a readout judges, and the gates it tries (None: no gate)."""
    held = d["held"]
    if name == "v1":
        return held[0], (None,)
    if name == "mean-all":
        return held[1:].mean(0), (None,)
    if name.startswith("mean"):
        return held[-int(name[4:]) :].mean(0), (None,)
    if name == "gate":
        return held[-1], (None, *GATES)
    if name == "last":
        return held[-1], (None,)
    raise ValueError(f"unknown readout {name!r} (expected one of {', '.join(READOUTS)})")


def frontier(
    tags: list[str],
    seeds: list[int],
    levels: tuple[int, ...] = (2, 5, 10, 15),
    readouts: tuple[str, ...] = ("last",),
    lowest_offset: float = -1.0,
) -> str:
    """What a training variant makes possible, whatever the selection: at each level w, the best held-out
    target gain over the whole split (1,000 per class) of a readout of the run (READOUTS; the last
    checkpoint by default), its target offset chosen with the held-out split in view, among offsets where no
    protected class loses more than w net images of 1,000. The tuning world only: its held-out split is the
    tuning judge. Offsets run from ``lowest_offset`` to 1.5 log-probability units: an unconstrained run's
    target sits far above v1's, and only an offset far below 0 brings its flips down."""
    from safespec.certify.selection import margins

    offsets = np.arange(lowest_offset, 1.5, 0.02)
    lines = [
        "| variant | " + " | ".join(f"gain at <= {w} net flips / 1,000 (seeds; mean)" for w in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for tag in tags:
        for readout in readouts:
            per_level: dict[int, list[float]] = {w: [] for w in levels}
            for s in seeds:
                d = dict(np.load(OUT / f"s{s}{tag}.npz"))
                y, t = d["held_labels"], int(d["target"])
                old = margins(d["held"][0], y) > 0
                top2 = np.sort(d["held"][0], 1)[:, -2:]
                v1_margin, v1_pred = top2[:, 1] - top2[:, 0], d["held"][0].argmax(1)
                logits, gates = _readout(d, readout)
                pts = []
                for off in offsets:
                    says_target = margins(logits, np.full(len(y), t), t, float(off)) > 0
                    right = margins(logits, y, t, float(off)) > 0
                    for g in gates:
                        new = right
                        if g is not None:
                            kept = says_target & (v1_pred != t) & (v1_margin > g)
                            new = np.where(kept, old, right)
                        pts.append(net_flips_and_gain(old, new, y, t))
                for w in levels:
                    per_level[w].append(max([g for n, g in pts if n <= w] + [0.0]))
            cells = [" / ".join(f"{g:+.3f}" for g in per_level[w]) + f"; {np.mean(per_level[w]):+.3f}" for w in levels]
            name = (tag or "the demo spec") + ("" if readout == "last" else f", {readout}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _choose_offsets(
    d: dict, logits: np.ndarray, rows: np.ndarray, budget: int, per_rival: bool, grid: np.ndarray
) -> np.ndarray:
    """The offsets with the most target images right on ``rows`` for which no protected class loses more
    than ``budget`` net images there: one offset for every rival, or one per rival class (separable,
    each rival's own best)."""
    from safespec.certify.selection import margins

    y, t = d["held_labels"][rows], int(d["target"])
    z = np.asarray(logits[rows], dtype=np.float64)
    old = margins(d["held"][0][rows], y) > 0
    rest = z.copy()
    rest[:, t] = -np.inf
    comp, gap = rest.argmax(1), z[:, t] - rest.max(1)
    says = gap[:, None] + grid[None, :] > 0  # rows x offsets: the target wins
    n_classes = z.shape[1]
    net = np.zeros((n_classes, len(grid)), dtype=np.int64)  # class k's net flips, the target against k
    right = np.zeros((n_classes, len(grid)), dtype=np.int64)  # target images right, the target against k
    for k in range(n_classes):
        if k == t:
            continue
        m = comp == k
        mine = m & (y == k)
        net[k] = (says[mine] & old[mine][:, None]).sum(0) - (~says[mine] & ~old[mine][:, None]).sum(0)
        right[k] = says[m & (y == t)].sum(0)
    if per_rival:
        out = np.full(n_classes, grid[0])
        for k in range(n_classes):
            ok = np.flatnonzero(net[k] <= budget)
            if k != t and len(ok):
                out[k] = grid[ok[np.argmax(right[k][ok])]]
        return out
    ok = np.flatnonzero(np.delete(net, t, 0).max(0) <= budget)
    best = ok[np.argmax(right.sum(0)[ok])] if len(ok) else 0
    return np.full(n_classes, grid[best])


def split_frontier(
    tags: list[str], seeds: list[int], budgets: tuple[int, ...] = (0, 1, 2, 3, 5), lowest_offset: float = -1.0
) -> str:
    """One target offset against one per rival class (``safespec.certify.selection.rival_offsets``), chosen on one half of
    the held-out split (odd or even rows) at a net-flip budget per 500 images and judged on the other half,
    both ways round: the judged gain and the judged worst net flips, as means over seeds and halves.
    Choosing and judging apart matters here: nine thresholds fitted to the edge of one sample flip more on
    the next, and reading the judged half's flips to pick a budget would fit them again."""
    grid = np.arange(lowest_offset, 1.5, 0.02)
    lines = [
        "| variant | offsets | "
        + " | ".join(f"chosen at <= {b} net flips / 500: judged gain, worst net flips" for b in budgets)
        + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for tag in tags:
        for per in (False, True):
            cells = []
            for b in budgets:
                pts = []
                for s in seeds:
                    d = dict(np.load(OUT / f"s{s}{tag}.npz"))
                    y, t = d["held_labels"], int(d["target"])
                    old = d["held"][0].argmax(1) == y
                    for even in (True, False):
                        judged = (np.arange(len(y)) % 2 == 0) == even
                        o = _choose_offsets(d, d["held"][-1], ~judged, b, per, grid)
                        new = rival_offsets(d["held"][-1], t, o).argmax(1) == y
                        pts.append(net_flips_and_gain(old[judged], new[judged], y[judged], t))
                cells.append(f"{np.mean([g for _, g in pts]):+.3f}, {np.mean([n for n, _ in pts]):.1f}")
            lines.append(
                f"| {tag or 'the demo spec'} | {'one per rival' if per else 'one'} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def calibration(seeds: list[int], vals: list[int], helds: list[int], tag: str = "") -> str:
    """How well selection's predicted chance that every capability passes matches the certificate: at every
    recorded candidate and at 31 target offsets, the predicted probability (from validation, as selection
    computes it) against whether the certificate on each held-out chunk certified every capability."""
    from safespec.certify.selection import Capability, Selector, margins
    from safespec.certify.stats import certifies

    bins = [(0.05, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.01)]
    lines = [
        "| validation / class | held-out / class | "
        + " | ".join(f"P in [{lo}, {min(hi, 1.0)}{']' if hi > 1 else ')'}" for lo, hi in bins)
        + " |",
        "|---|---|" + "---|" * len(bins),
    ]
    for V in vals:
        for H in helds:
            P, outcome = [], []
            for s in seeds:
                d = dict(np.load(OUT / f"s{s}{tag}.npz"))
                y, yv, t = d["held_labels"], d["val_labels"], int(d["target"])
                others = [int(c) for c in np.unique(y) if c != t]
                caps = [Capability(str(c), (c,), TOL, CONF, H) for c in others]
                old = margins(d["held"][0], y) > 0
                for draw in range(3 if V < 60 else 1):
                    rng = np.random.default_rng(1000 * s + draw)
                    vrows = np.concatenate(
                        [np.sort(rng.permutation(np.flatnonzero(yv == c))[:V]) for c in np.unique(yv)]
                    )
                    sel = Selector(d["val"][0][vrows], yv[vrows], caps, t, 0.8)
                    for k in range(1, len(d["steps"])):
                        for off in np.linspace(-0.3, 1.2, 31):
                            p = sel.probability(d["val"][k][vrows], float(off))
                            new = margins(d["held"][k], y, t, float(off)) > 0
                            for chunk in range(1000 // H):
                                ok = True
                                for c in others:
                                    r = np.flatnonzero(y == c)[chunk * H : (chunk + 1) * H]
                                    b, cp = int((old[r] & ~new[r]).sum()), int((~old[r] & new[r]).sum())
                                    ok = ok and certifies(b, cp, H, TOL, CONF)
                                P.append(p)
                                outcome.append(ok)
            Pa, Oa = np.array(P), np.array(outcome)
            cells = []
            for lo, hi in bins:
                m = (Pa >= lo) & (Pa < hi)
                cells.append(f"{Pa[m].mean():.2f} -> {Oa[m].mean():.2f} ({m.sum()})" if m.any() else "")
            lines.append(f"| {V} | {H} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.selection_replay")
    ap.add_argument("what", choices=["record", "table", "frontier", "split-frontier", "calibration"])
    ap.add_argument("--tags", nargs="+", default=[""], help="frontier: the recorded variants, by tag")
    ap.add_argument("--readouts", nargs="+", default=["last"], choices=READOUTS, help="frontier: what of each run")
    ap.add_argument("--lowest-offset", type=float, default=-1.0, help="frontier: where the offset grid starts")
    ap.add_argument("--val", type=int, nargs="+", default=[60, 50])
    ap.add_argument("--heldout", type=int, nargs="+", default=[400, 200])
    ap.add_argument("--q", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML")
    ap.add_argument("--tag", default="")
    ap.add_argument("--goal", type=float, default=GOAL, help="the target's min_improvement")
    ap.add_argument(
        "--rules", nargs="+", default=["target", "release"], choices=RULES, help="table: the selection rules"
    )
    a = ap.parse_args(argv)
    settings = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.set)}
    if a.what == "calibration":
        print(calibration(a.seeds, a.val, a.heldout, a.tag))
        return 0
    if a.what == "frontier":
        print(frontier(a.tags, a.seeds, readouts=tuple(a.readouts), lowest_offset=a.lowest_offset))
        return 0
    if a.what == "split-frontier":
        print(split_frontier(a.tags, a.seeds, lowest_offset=a.lowest_offset))
        return 0
    if a.what == "table":
        print(table(a.seeds, a.val, a.heldout, a.q, a.tag, a.goal, tuple(a.rules)))
        return 0
    record(a.seeds, settings, a.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
