"""Tuning on the tuning world: settings are chosen here and reported on the demo and second worlds.

The tuning world (``bench.worlds``: Fashion-MNIST's training split, target dress) is never reported on, so
its held-out split may be looked at: it is the tuning judge. A variant of the demo spec (class names and
paths changed, then the variant's settings) runs on it as the demo runs on its own world: its held-out
split has 400 images per class, so selection plans for the demo's certificate. The selected model is then
judged on 600 more held-out images per class with ``safespec verify``; a row reports the target gain and
every capability's flips over all 1,000, so that settings 2 points apart are told apart.

    python -m bench.tune_world NAME [--set optimize.lr=2e-4 ...] [--seeds 0 1 2]   # runs and logs a variant
    python -m bench.tune_world --table                                             # the log as a table

Each run appends a line to bench/results/tuning-world.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.quality import set_dotted
from bench.worlds import DEMO_SPEC, REPO, build, spec_for

LOG = REPO / "bench" / "results" / "tuning-world.jsonl"
OUT = REPO / "out" / "tune"
CERTIFY_N = 400  # held-out images per class the run certifies on (the demo's)


def split_heldout(manifest: Path, first: int = CERTIFY_N) -> tuple[Path, Path]:
    """The world's held-out manifest as two: the first ``first`` rows of each class (the run's held-out
    split) and the rest (the judge's). Rows keep the manifest's order, so the split is fixed."""
    with manifest.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    by_class: dict[str, list[list[str]]] = {}
    for r in body:
        by_class.setdefault(r[1], []).append(r)
    paths = manifest.parent / f"heldout-first{first}.csv", manifest.parent / f"heldout-after{first}.csv"
    for path, part in zip(paths, (slice(0, first), slice(first, None))):
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            for label in by_class:
                w.writerows(by_class[label][part])
    return paths


def summarise(run: dict[str, Any], judge: dict[str, Any]) -> dict[str, Any]:
    """One row from the run's result.json and the judge's (the same model on the judge's images): gain,
    flips and the worst capability over both, certified counts and exit code as the run saw them."""
    caps = {c["name"]: c for c in run["capabilities"]}
    jcaps = {c["name"]: c for c in judge["capabilities"]}
    neg = {k: caps[k]["negative_flips"] + jcaps[k]["negative_flips"] for k in caps}
    pos = {k: caps[k]["positive_flips"] + jcaps[k]["positive_flips"] for k in caps}
    t, jt = run["target"], judge["target"]
    n = t["n"] + jt["n"]
    gain = ((t["new_accuracy"] - t["old_accuracy"]) * t["n"] + (jt["new_accuracy"] - jt["old_accuracy"]) * jt["n"]) / n
    worst = max(neg, key=lambda k: (neg[k] - pos[k], k))
    return {
        "gain_run": round(t["new_accuracy"] - t["old_accuracy"], 4),
        "gain": round(gain, 4),
        "n_per_class": n,
        "negative_flips": sum(neg.values()),
        "positive_flips": sum(pos.values()),
        "worst": worst,
        "worst_net_flips": neg[worst] - pos[worst],
        "certified_run": sum(c["status"] == "certified" for c in run["capabilities"]),
        "certified_judge": sum(c["status"] == "certified" for c in judge["capabilities"]),
        "goal_met": bool(t["goal_met"]),
        "exit": 0 if run["verdict"] == "certified" and t["goal_met"] else 1,
        "step": (run.get("selection") or {}).get("step"),
    }


def run_variant(
    name: str, settings: dict[str, Any], seeds: list[int], *, heldout: int = CERTIFY_N, quiet: bool = True
) -> list[dict]:
    import torch

    from safespec.api import run_cycle, verify_candidate

    torch.set_num_threads(1)
    world = build("tuning", quiet=quiet)
    first, after = split_heldout(Path(world.manifests["heldout"]), heldout)
    base = yaml.safe_load(spec_for(world, out_dir=OUT / "spec").read_text())
    base["data"]["heldout"] = str(first)
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if quiet else print
    rows = []
    for seed in seeds:
        spec = copy.deepcopy(base)
        spec["optimize"]["seed"] = seed
        for k, v in settings.items():
            set_dotted(spec, k, v)
        spec["report"]["dir"] = str(out / f"s{seed}")
        path = out / f"spec-s{seed}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        t0 = time.perf_counter()
        result = run_cycle(path, quiet=True, log=log, command=f"bench.tune_world {name}")
        seconds = time.perf_counter() - t0
        judge_spec = copy.deepcopy(spec)
        judge_spec["data"]["heldout"] = str(after)
        judge_spec["report"]["dir"] = str(out / f"s{seed}" / "judge")
        jpath = out / f"judge-s{seed}.yaml"
        jpath.write_text(yaml.safe_dump(judge_spec, sort_keys=False))
        model = out / f"s{seed}" / result["provenance"]["new_model"]["path"]
        judge = verify_candidate(jpath, model, log=log, command=f"bench.tune_world {name} (judge)")
        row = {"seed": seed, **summarise(result, judge), "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{name} seed {seed}: {row}", file=sys.stderr, flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as fh:
        fh.write(json.dumps({"name": name, "settings": settings, "heldout": heldout, "rows": rows}) + "\n")
    return rows


def table(path: Path = LOG) -> str:
    """The log as a markdown table, one row per variant, seeds side by side. A variant's seeds may come
    from separate runs (two seeds in parallel): its lines with the same settings are merged, the latest
    row of each seed kept; a line with other settings starts the variant over."""
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            prev = latest.get(e["name"])
            if prev is not None and (prev["settings"], prev.get("heldout")) == (e["settings"], e.get("heldout")):
                by_seed = {r["seed"]: r for r in prev["rows"] + e["rows"]}
                e = {**e, "rows": [by_seed[s] for s in sorted(by_seed)]}
            latest[e["name"]] = e
    out = [
        "| variant | settings | held-out of the run | gain (1,000 per class) | worst capability: net negative "
        "flips of 1,000 | negative flips (all) | certified of 9 (the run) | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in latest.items():
        rows = e["rows"]
        sets = ", ".join(f"`{k}: {v}`" for k, v in e["settings"].items()) or "the demo spec"
        gains = " / ".join(f"{r['gain']:+.3f}" for r in rows)
        mean = sum(r["gain"] for r in rows) / len(rows)
        worst = " / ".join(f"{r['worst']} {r['worst_net_flips']}" for r in rows)
        out.append(
            f"| {name} | {sets} | {e.get('heldout', CERTIFY_N)} | {gains} (mean {mean:+.3f}) | {worst} | "
            f"{' / '.join(str(r['negative_flips']) for r in rows)} | "
            f"{' / '.join(str(r['certified_run']) for r in rows)} | {' '.join(str(r['exit']) for r in rows)} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune_world", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help="the variant's name (its run directories: out/tune/NAME/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="a spec setting, dotted")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--heldout",
        type=int,
        default=CERTIFY_N,
        help=f"held-out images per class the run certifies on (default {CERTIFY_N})",
    )
    ap.add_argument("--table", action="store_true", help="print the log as a markdown table")
    a = ap.parse_args(argv)
    if a.table:
        print(table())
        return 0
    if not a.name:
        ap.error("give a variant name, or --table")
    settings = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    from safespec.errors import SafespecError

    try:
        base = yaml.safe_load(DEMO_SPEC.read_text())
        for key, value in settings.items():  # a bad path fails here, in one line, before anything runs
            set_dotted(base, key, value)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        print(f"error: --set: {key}: no such place in the demo spec ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    try:
        run_variant(a.name, settings, a.seeds, heldout=a.heldout)
    except SafespecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
