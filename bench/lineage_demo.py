"""The two-cycle demo (``safespec demo --cycles 2``) at other seeds, for bench/RESULTS.md: the same lineage
world and specs, ``optimize.seed`` set in both cycles, each seed in its own folder under out/bench-lineage/.

    python -m bench.lineage_demo --seeds 1 2

Appends one line per seed to bench/results/lineage-demo.jsonl: each cycle's verdict, goal, registration and
wall time, and (when cycle 2 ran) every class's held-out accuracy under v1, v2 and v3 and the budgets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import yaml

from bench.worlds import REPO
from safespec.api import run_cycle
from safespec.demo import build_world
from safespec.demo.cycles import LINEAGE_WORLD, accuracy_table, lineage_specs

LOG = REPO / "bench" / "results" / "lineage-demo.jsonl"
SPECS = REPO / "specs"


def run_seed(seed: int) -> dict:
    world = build_world(REPO / "out" / "world-lineage", LINEAGE_WORLD, progress=False, log=None)
    out = REPO / "out" / "bench-lineage" / f"s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    first, second = lineage_specs(SPECS / "demo.yaml", SPECS / "demo-cycle2.yaml", out)
    for path in (first, second):
        spec = yaml.safe_load(path.read_text())
        spec["optimize"]["seed"] = seed
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    row: dict = {"seed": seed, "v1": world.v1_accuracy, "cycles": []}
    for path in (first, second):
        t0 = time.perf_counter()
        result = run_cycle(path, quiet=True, log=lambda s: None, command=f"bench.lineage_demo seed {seed}")
        row["cycles"].append(
            {
                "spec": path.name,
                "verdict": result["verdict"],
                "goal_met": result["target"]["goal_met"],
                "target": result["target"]["class"],
                "improvement": result["target"]["improvement"],
                "registration": result["lineage"]["registration"],
                "seconds": round(time.perf_counter() - t0, 1),
                "not_met": [c["name"] for c in result["capabilities"] if not c["meets_requirement"]],
            }
        )
        if not result["lineage"]["release"] and path == first:
            break
    if len(row["cycles"]) == 2:  # the second cycle evaluated v1 and v2 on its held-out split
        row["accuracy"] = accuracy_table(result)
        row["budgets"] = result["lineage"]["budgets"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lineage_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    for seed in args.seeds:
        row = run_seed(seed)
        print(json.dumps(row), file=sys.stderr, flush=True)
        with LOG.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
