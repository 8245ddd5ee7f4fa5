"""Synthetic run directories for the report tests.

The report renders from result.json and the run directory alone, so its tests build those by hand from
paired counts (old right/wrong x new right/wrong per class), with statuses derived from a simple normal
bound. The numbers are realistic in shape, not the output of certify.py: the report must render whatever
a valid result.json says, and these tests must not depend on the statistics module.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image

# (capability name, [(class, n, old_correct, negative_flips, positive_flips), ...])
MIXED = [
    ("bear", [("bear", 400, 360, 4, 6)]),
    ("cat", [("cat", 400, 350, 5, 3)]),
    ("farm", [("cow", 400, 340, 6, 4), ("horse", 400, 330, 5, 5)]),
    ("deer", [("deer", 400, 300, 14, 4)]),
    ("elephant", [("elephant", 400, 370, 3, 2)]),
    ("fox", [("fox", 400, 280, 12, 5)]),
    ("lion", [("lion", 400, 320, 30, 6)]),
    ("rabbit", [("rabbit", 12, 10, 1, 0)]),
    ("tiger", [("tiger", 400, 360, 2, 3)]),
]
TARGET = ("dog", 400, 156, 10, 94)
TOLERANCE = 0.03
CONFIDENCE = 0.95
Z95 = 1.6448536269514722


def drop_bound(n: int, b: int, c: int) -> float:
    """A normal-approximation bound: good enough to give the synthetic statuses a realistic spread."""
    d = (b - c) / n
    var = max((b + c) / n - d * d, 0.0) / n
    return d + Z95 * math.sqrt(var)


def status_of(n: int, b: int, c: int, tol: float) -> str:
    if n < 30:
        return "inconclusive"
    if drop_bound(n, b, c) <= tol:
        return "certified"
    return "preserved" if (b - c) / n <= tol else "violated"


def _capability(name: str, rows: list[tuple], require: str, tol: float) -> dict[str, Any]:
    n = sum(r[1] for r in rows)
    old = sum(r[2] for r in rows)
    b = sum(r[3] for r in rows)
    c = sum(r[4] for r in rows)
    new = old - b + c
    status = status_of(n, b, c, tol)
    per_class = []
    for cls, cn, co, cb, cc in rows:
        per_class.append(
            {
                "class": cls,
                "n": cn,
                "old_accuracy": co / cn,
                "new_accuracy": (co - cb + cc) / cn,
                "negative_flips": cb,
                "positive_flips": cc,
                "drop_upper_bound": drop_bound(cn, cb, cc),
                "status": status_of(cn, cb, cc, tol),
            }
        )
    ok = ("certified",) if require == "certified" else ("certified", "preserved")
    return {
        "name": name,
        "classes": [r[0] for r in rows],
        "status": status,
        "meets_requirement": status in ok,
        "tolerance": tol,
        "confidence": CONFIDENCE,
        "n": n,
        "old_accuracy": old / n,
        "new_accuracy": new / n,
        "accuracy_change": (new - old) / n,
        "drop_upper_bound": drop_bound(n, b, c),
        "new_accuracy_lower": max(0.0, new / n - 0.03),
        "flip_rate_upper": min(1.0, b / n + 0.01),
        "negative_flips": b,
        "positive_flips": c,
        "both_right": old - b,
        "both_wrong": n - old - c,
        "needed_n": None if status == "certified" else (None if status == "violated" else 4 * n),
        "per_class": per_class,
    }


def png_bytes(seed: int, size: int = 28) -> bytes:
    rng = random.Random(seed)
    img = Image.new("L", (size, size))
    img.putdata([rng.randrange(256) for _ in range(size * size)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_result(
    caps: list[tuple] = MIXED,
    *,
    require: str = "certified",
    tol: float = TOLERANCE,
    target: tuple = TARGET,
    flips_per_class: int = 3,
    baselines: bool = True,
    name: str = "animals-dog-v2",
) -> dict[str, Any]:
    """A realistic result.json (schema_version 1) whose verdict follows from its capabilities."""
    capabilities = [_capability(cname, rows, require, tol) for cname, rows in caps]
    verdict = "certified" if capabilities and all(c["meets_requirement"] for c in capabilities) else "not_certified"
    t_cls, t_n, t_old, t_b, t_c = target
    t_new = t_old - t_b + t_c
    improvement = (t_new - t_old) / t_n
    classes = [r[0] for _, rows in caps for r in rows]
    classes.insert(len(classes) // 2, t_cls)
    per_class = []
    rows_by_class = {r[0]: r for _, rows in caps for r in rows}
    rows_by_class[t_cls] = target
    for cls in classes:
        _, n, o, b, c = rows_by_class[cls]
        per_class.append(
            {
                "class": cls,
                "n": n,
                "old_accuracy": o / n,
                "new_accuracy": (o - b + c) / n,
                "old_loss": round(1.2 - o / n, 4),
                "new_loss": round(1.2 - (o - b + c) / n, 4),
                "negative_flips": b,
                "positive_flips": c,
            }
        )
    k = len(classes)
    confusion = None
    if k <= 20:
        old_m = [[0] * k for _ in range(k)]
        new_m = [[0] * k for _ in range(k)]
        ti = classes.index(t_cls)
        for i, cls in enumerate(classes):
            _, n, o, b, c = rows_by_class[cls]
            old_m[i][i] = o
            old_m[i][(i + 1) % k] = n - o
            new_m[i][i] = o - b + c
            j = ti if i != ti else (i + 1) % k
            new_m[i][j] += n - (o - b + c)
        confusion = {"old": old_m, "new": new_m}
    flips = []
    for cls in classes:
        _, n, o, b, c = rows_by_class[cls]
        for i in range(min(b, flips_per_class)):
            flips.append(
                {
                    "class": cls,
                    "path": f"flips/{cls}-{i:04d}.png",
                    "source": f"heldout/{cls}/{100 + i}.png",
                    "old_pred": cls,
                    "new_pred": t_cls if cls != t_cls else classes[0],
                }
            )
    result: dict[str, Any] = {
        "schema_version": 1,
        "verdict": verdict,
        "require": require,
        "spec": {
            "name": name,
            "title": "Animals: better dogs, nothing forgotten",
            "description": "Improve the weak 'dog' class while keeping every other animal.",
            "path": "specs/demo.yaml",
            "digest": "sha256:" + "ab" * 32,
            "text": "safespec: 1\nname: animals-dog-v2\ntarget:\n  class: dog\n",
        },
        "method": "penalty",
        "classes": classes,
        "capabilities": capabilities,
        "target": {
            "class": t_cls,
            "n": t_n,
            "old_accuracy": t_old / t_n,
            "new_accuracy": t_new / t_n,
            "improvement": improvement,
            "improvement_interval": [improvement - 0.05, improvement + 0.05],
            "new_accuracy_interval": [t_new / t_n - 0.05, t_new / t_n + 0.05],
            "confidence": CONFIDENCE,
            "goal": {"min_accuracy": None, "min_improvement": 0.15},
            "goal_met": improvement >= 0.15,
        },
        "per_class": per_class,
        "confusion": confusion,
        "flips": flips,
        "selection": {
            "step": 600,
            "reason": "highest validation target metric among feasible checkpoints",
            "fell_back_to_old": False,
        },
        "training": {"steps": 900, "seconds": 93.1, "trajectory": "trajectory.jsonl"},
        "baselines": [],
        "statistics": {"drop_bound": "Tango score (one-sided)", "accuracy_bounds": "Clopper-Pearson (one-sided)"},
        "provenance": {
            "spec_digest": "sha256:" + "ab" * 32,
            "old_model": {"source": "world:v1", "digest": "sha256:" + "01" * 32},
            "new_model": {"path": "checkpoints/best.safetensors", "digest": "sha256:" + "02" * 32},
            "data": {
                "protected": "sha256:" + "03" * 32,
                "target": "sha256:" + "04" * 32,
                "validation": "sha256:" + "05" * 32,
                "heldout": "sha256:" + "06" * 32,
            },
            "seed": 0,
            "versions": {"safespec": "0.1.0", "torch": "2.13.0", "open_clip": "3.3.0", "python": "3.11.2"},
            "command": "safespec run specs/demo.yaml",
            "started": "2025-01-01T10:00:00+00:00",
            "finished": "2025-01-01T10:01:40+00:00",
            "host": "ci-runner-1",
        },
    }
    if baselines:
        result["baselines"] = [
            {
                "method": "unconstrained",
                "verdict": "not_certified",
                "capabilities": [
                    {
                        "name": c["name"],
                        "status": "violated" if i % 2 else "preserved",
                        "accuracy_change": -0.08 if i % 2 else -0.01,
                        "drop_upper_bound": 0.1,
                    }
                    for i, c in enumerate(capabilities)
                ],
                "target": {"old_accuracy": t_old / t_n, "new_accuracy": 0.9},
            },
            {
                "method": "replay",
                "verdict": "not_certified",
                "error": None,
                "capabilities": [
                    {"name": c["name"], "status": "preserved", "accuracy_change": -0.01, "drop_upper_bound": 0.04}
                    for c in capabilities[:-1]
                ],
                "target": {"old_accuracy": t_old / t_n, "new_accuracy": 0.7},
            },
        ]
    return result


def make_trajectory(cap_names: list[str], evals: int = 10, every: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(evals):
        step = i * every
        cons = {n: round(0.02 * math.exp(-i / 3) - 0.01 + rng.uniform(-0.01, 0.01), 5) for n in cap_names}
        out.append(
            {
                "step": step,
                "lr": 1e-5,
                "beta": 100.0,
                "train_loss": round(0.9 - 0.05 * i + rng.uniform(0, 0.02), 4),
                "target_metric": round(0.4 + 0.2 * (1 - math.exp(-i / 3)), 4),
                "constraints": cons,
                "u": {n: v + 0.001 for n, v in cons.items()},
                "multipliers": {n: max(0.0, v * 10) for n, v in cons.items()},
                "val_accuracy": {n: 0.85 for n in cap_names},
                "feasible": all(v <= 0 for v in cons.values()),
            }
        )
    return out


def write_run(
    run_dir: Path,
    result: dict[str, Any] | None = None,
    *,
    trajectory: list[dict] | None = None,
    state: dict[str, Any] | None = None,
    write_flips: bool = True,
) -> Path:
    """Lay out a complete run directory as the runner would (ARCHITECTURE.md, 'The run directory')."""
    result = make_result() if result is None else result
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "state.json").write_text(
        json.dumps(state if state is not None else {"state": "complete", "reason": None})
    )
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    if trajectory is None:
        trajectory = make_trajectory([c["name"] for c in result["capabilities"]])
    if trajectory:
        (run_dir / "trajectory.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trajectory))
    if write_flips:
        for i, f in enumerate(result.get("flips") or ()):
            p = run_dir / f["path"]
            if p.resolve().is_relative_to(run_dir.resolve()):
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(png_bytes(i))
    return run_dir


def many_capabilities(count: int = 365, seed: int = 1) -> list[tuple]:
    """A Places365-sized spec: one capability per class, mostly certified, some not."""
    rng = random.Random(seed)
    caps = []
    for i in range(count):
        n = 1000
        old = rng.randrange(600, 950)
        b = rng.randrange(0, 12) if i % 23 else rng.randrange(30, 60)
        c = rng.randrange(0, 12)
        caps.append((f"place_{i:03d}", [(f"place_{i:03d}", n, old, b, c)]))
    return caps
