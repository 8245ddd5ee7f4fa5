"""Golden fingerprints: short runs of every method, so that a refactor can show it changed no number.

Issue 13 restructures the package without changing behaviour. "The same numbers, bit for bit" is checked
here: each case is a short `safespec run` of one method (or one method setting the demo uses), and its
fingerprint is what a changed computation would move: the selected step and target offset, the digest
of the selected model's weights, and every capability's paired counts and accuracies. The test suite
checks the small test world's fingerprints against ``tests/golden/small-world.json``; the demo world's
are kept in ``bench/results/golden-demo.json``.

    python -m bench.golden record --spec specs/demo.yaml --out bench/results/golden-demo.json
    python -m bench.golden check  --spec specs/demo.yaml --against bench/results/golden-demo.json

A fingerprint is only comparable on the same torch build and CPU kind (float kernels differ across them);
runs are recorded on one torch thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from bench.quality import spec_with
from safespec.api import run_cycle


def float_platform() -> str:
    """What a fingerprint is comparable across: the torch build, the CPU kernels it dispatches to and the
    CPU's vendor (the same ISA level runs other kernels, and so other float rounding, on Intel and AMD)."""
    vendor = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            vendor = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {vendor}"


#: Every method, and the settings the demo spec adds to the Lagrangian (the target tower with its
#: calibrated offset, focal distillation with store views), each as spec overrides.
CASES: dict[str, dict] = {
    "penalty": {"optimize.method": "penalty"},
    "lagrangian": {"optimize.method": "lagrangian"},
    # (a baseline is kept as trained: the target offset calibrates the constrained methods only)
    "unconstrained": {"optimize.method": "unconstrained", "optimize.calibrate": {"target_offset": False}},
    "replay": {"optimize.method": "replay", "optimize.calibrate": {"target_offset": False}},
    "wise-ft": {"optimize.method": "wise-ft", "optimize.calibrate": {"target_offset": False}},
    "contrastive": {"optimize.method": "penalty", "optimize.objective": "contrastive"},
    "focal-distill": {
        "optimize.method": "lagrangian",
        "optimize.store_views": 2,
        "protect.0.constraint": {"metric": "focal-distill", "slack": 0.003},
    },
    "target-tower": {
        "optimize.method": "lagrangian",
        "model.target_tower": True,
        "optimize.calibrate": {"target_offset": True},
    },
}


#: The trajectory fields that training computes (a run that keeps the old model still trained: these see it).
TRAJECTORY_FIELDS = (
    "step",
    "train_loss",
    "target_metric",
    "constraints",
    "val_drop",
    "u",
    "multipliers",
    "certify_probability",
    "val_drop_smooth",
    "target_offset",
    "target_calibrated",
)


def fingerprint(result: dict, trajectory: list[dict] | None = None) -> dict:
    """What a change of computation would move in one run's result.json and its training trajectory."""
    sel = result["selection"]
    return {
        "trajectory": [{k: e[k] for k in TRAJECTORY_FIELDS if k in e} for e in trajectory or []],
        "verdict": result["verdict"],
        "selected_step": sel["step"],
        "target_offset": sel.get("target_offset"),
        "model_digest": result["provenance"]["new_model"]["digest"],
        "target": {k: result["target"][k] for k in ("old_accuracy", "new_accuracy", "goal_met")},
        "capabilities": {
            c["name"]: {
                k: c[k]
                for k in (
                    "status",
                    "negative_flips",
                    "positive_flips",
                    "both_right",
                    "both_wrong",
                    "new_accuracy",
                    "drop_upper_bound",
                )
            }
            for c in result["capabilities"]
        },
    }


def record(spec_path: Path, *, steps: int, cases: dict[str, dict] | None = None, log=print) -> dict:
    """Run every case for ``steps`` steps from ``spec_path`` and return ``{case: fingerprint}``. Torch runs on
    one thread meanwhile: a reduction split over more threads rounds differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _record(spec_path, steps=steps, cases=cases, log=log)
    finally:
        torch.set_num_threads(threads)


def _record(spec_path: Path, *, steps: int, cases: dict[str, dict] | None, log) -> dict:
    out: dict[str, dict] = {}
    for name, over in (cases or CASES).items():
        over = {
            **over,
            "optimize.steps": steps,
            "optimize.warmup_steps": steps // 4,
            "optimize.eval_every": max(1, steps // 2),
            "optimize.checkpoint_every": steps,
            "optimize.baselines": [],
        }
        with tempfile.TemporaryDirectory(prefix="golden-") as tmp, spec_with(spec_path, over) as path:
            run_dir = Path(tmp) / name
            result = run_cycle(path, quiet=True, out=run_dir, log=lambda s: None, command="bench.golden")
            lines = (run_dir / "trajectory.jsonl").read_text().splitlines()
        out[name] = fingerprint(result, [json.loads(x) for x in lines if x.strip()])
        log(f"{name}: step {out[name]['selected_step']} {out[name]['model_digest'][:19]} {out[name]['verdict']}")
    return {"steps": steps, "cases": out}


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    """Every leaf where two fingerprints differ, as 'path: a != b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b), key=str):
            diffs += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return diffs
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.golden", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("record", "check"):
        p = sub.add_parser(name)
        p.add_argument("--spec", type=Path, default=Path("specs/demo.yaml"))
        p.add_argument("--steps", type=int, default=20)
        if name == "record":
            p.add_argument("--out", type=Path, required=True)
        else:
            p.add_argument("--against", type=Path, required=True)
    a = ap.parse_args(argv)
    got = record(a.spec, steps=a.steps)
    if a.cmd == "record":
        a.out.write_text(json.dumps(got, indent=1) + "\n")
        return
    diffs = differences(json.loads(a.against.read_text()), got)
    print("\n".join(diffs) if diffs else "identical")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
