"""Wall time and peak memory of the demo cycle, `safespec run specs/demo.yaml`, with the world already built
(issue 6, section 1). Goal: at most 3 minutes on 2 cores.

The run is a separate process, as a user starts it, with an empty prediction cache (so the old model's
references are computed, as on the first run of a new spec) and its own run directory. Its peak resident
memory is that process's own ``ru_maxrss`` (from ``wait4``, so no other child of this process counts).
``--quick`` runs the same spec cut to a few steps: a smoke run of the harness, not the demo's time.

    python -m bench.demo [--quick] [--spec specs/demo.yaml]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .overhead import shown

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "specs" / "demo.yaml"
GOAL_SECONDS = 180.0


def quick_spec(spec_path: Path, folder: Path, steps: int = 20) -> Path:
    """The spec with its relative paths made absolute (it moves to ``folder``) and training cut to
    ``steps`` steps without baselines."""
    spec = yaml.safe_load(spec_path.read_text())
    base = spec_path.resolve().parent

    def absolute(p: str) -> str:
        return str(p if Path(p).is_absolute() else (base / p).resolve())

    if spec["model"].get("checkpoint"):
        spec["model"]["checkpoint"] = absolute(spec["model"]["checkpoint"])
    spec["data"] = {k: absolute(v) for k, v in spec["data"].items()}
    o = spec.setdefault("optimize", {})
    o.update(steps=steps, eval_every=steps // 2, checkpoint_every=steps // 2, warmup_steps=2, baselines=[])
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(spec_path: Path = DEMO_SPEC, *, quick: bool = False, log=lambda s: None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = quick_spec(spec_path, tmp) if quick else spec_path
        cmd = [sys.executable, "-m", "safespec", "run", str(spec), "--quiet", "--out", str(tmp / "run")]
        env = {**os.environ, "SAFESPEC_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        log(f"demo: {' '.join(cmd)}")
        load_before = [round(x, 2) for x in os.getloadavg()]
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        result_path = tmp / "run" / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        stderr_tail = (tmp / "stderr").read_text(errors="replace").strip().splitlines()[-5:]
    peak_mib = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return {
        "command": f"safespec run {shown(spec_path)} --quiet"
        + (" (the spec cut to a few steps, no baselines: --quick)" if quick else ""),
        "quick": quick,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(peak_mib, 1),
        "verdict": result["verdict"] if result else None,
        "target_goal_met": result["target"]["goal_met"] if result else None,
        "training_seconds": result["training"]["seconds"] if result and result.get("training") else None,
        "methods": [result["method"], *[b["method"] for b in result["baselines"]]] if result else None,
        "prediction_cache": "empty at start",
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "stderr_tail": stderr_tail if proc.returncode not in (0, 1) else [],
    }


def goals(r: dict) -> list[tuple[str, float, str, bool]]:
    return [
        (
            "demo wall time, s" + (" (quick: cut spec)" if r["quick"] else ""),
            r["wall_s"],
            f"<= {GOAL_SECONDS:.0f}",
            r["wall_s"] <= GOAL_SECONDS and r["exit_code"] in (0, 1),
        )
    ]


def markdown(r: dict) -> str:
    lines = [
        f"`{r['command']}` in a subprocess, world built, prediction cache {r['prediction_cache']}; "
        f"{r['cpus']} cores, load average {r['load_average_before'][0]} before, "
        f"{r['load_average_after'][0]} after.",
        "",
        "| wall s | CPU s | peak RSS MiB | exit code | verdict | target goal met | training s (main method) | methods |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['exit_code']} | {r['verdict']} "
        f"| {r['target_goal_met']} | {r['training_seconds']} | {', '.join(r['methods'] or [])} |",
    ]
    if r["stderr_tail"]:
        lines += ["", "The run failed:", "", "```", *r["stderr_tail"], "```"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the spec cut to a few steps (a smoke run)")
    ap.add_argument("--spec", type=Path, default=DEMO_SPEC)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.spec, quick=a.quick, log=lambda s: print(s, file=sys.stderr, flush=True)), indent=2))


if __name__ == "__main__":
    main()
