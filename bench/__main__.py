"""`make bench`: run the benchmarks in one process on this machine and write bench/RESULTS.md.

Sections: the task-dependent heads' routed projection against the plain one (bench/heads.py) and the
quality of every method on the demo world (bench/quality.py). Each section's numbers are measured in
this one run, as ratios where they are timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="safespec benchmarks")
    ap.add_argument("--quick", action="store_true", help="one seed, no oracle (a smoke run of the harness)")
    a = ap.parse_args(argv)
    from . import heads, quality
    from safespec.world import build_world
    from safespec.specfile import load_spec

    spec = ROOT / "specs" / "demo.yaml"
    build_world(load_spec(spec, check_files=False).data.protected.parent, progress=False,
                log=lambda s: print(s, file=sys.stderr))
    out = ["# Benchmark results", "", f"Measured {datetime.date.today()} on {machine()} by `make bench`.", ""]
    h = heads.run()
    out += ["## Task-dependent heads: routed projection / plain projection", "",
            "```json", json.dumps(h, indent=2), "```", ""]
    seeds = [0] if a.quick else [0, 1, 2]
    q = quality.run(spec, seeds, ["penalty", "lagrangian", "unconstrained", "replay", "wise-ft"],
                    oracle=not a.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "quality.json").write_text(json.dumps(q, indent=2))
    out += ["## Quality on the demo world (held-out, 400 images per class)", "",
            f"v1 (the old model): {q['target']} {q['v1_accuracy'][q['classes'].index(q['target'])]:.3f}; "
            "Δ = new − v1 held-out accuracy of each of the 9 protected classes.", "", quality.table(q), ""]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
