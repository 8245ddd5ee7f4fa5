"""The two-cycle demo (``safespec demo --cycles 2``): v1 -> v2 improves dog, as the one-cycle demo does, and
v2 -> v3 improves bird, v1's weakest protected class, while dog's new accuracy is carried and every class's
drift against v1 and v2 stays within its budget (docs/lineage.md).

Both cycles run on the demo world. The second cycle needs two manifests the world does not write, derived
from its base-train split (so the world itself, and the one-cycle demo, stay exactly as they are):
- a store that holds dog too (v2 protects it);
- bird's target set: bird's base-train images as positives, 40 base-train images of every other class as
  negatives.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

from ..data import write_manifest

#: The second cycle's target: v1's weakest class after dog (0.815 held-out) in the demo world.
SECOND_TARGET = "bird"
NEGATIVES_PER_CLASS = 40


def write_cycle2_manifests(world: Path, *, seed: int = 0) -> dict[str, Path]:
    """protected-cycle2.csv and target-cycle2.csv beside the world's manifests (image paths stay relative to
    the world folder). Deterministic in the world and ``seed``; rewritten only when their content changes."""
    with (world / "base.csv").open(newline="") as fh:
        rows = [(r[0], r[1]) for r in list(csv.reader(fh))[1:]]
    with (world / "target.csv").open(newline="") as fh:
        target_rows = [(r[0], r[1]) for r in list(csv.reader(fh))[1:]]
    dogs = [r for r in target_rows if r[1] == "dog"]
    store = [(p, c, None) for p, c in rows + dogs]
    rng = np.random.default_rng(seed)
    positives = [(p, c, f"a photo of a {c}.") for p, c in rows if c == SECOND_TARGET]
    negatives = []
    for cls in sorted({c for _, c in rows + dogs} - {SECOND_TARGET}):
        pool = [r for r in rows + dogs if r[1] == cls]
        pick = rng.choice(len(pool), size=min(NEGATIVES_PER_CLASS, len(pool)), replace=False)
        negatives += [(pool[i][0], cls, f"a photo of a {cls}.") for i in sorted(pick)]
    out = {"protected": world / "protected-cycle2.csv", "target": world / "target-cycle2.csv"}
    write_manifest(out["protected"], store, captions=False)
    write_manifest(out["target"], positives + negatives, captions=True)
    return out


def lineage_specs(demo_spec: Path, cycle2_spec: Path, out: Path) -> tuple[Path, Path]:
    """The two cycles' spec files under ``out``: cycle 1 is the demo spec itself with a lineage section and
    its own run directory; cycle 2 is the shipped second-cycle spec as written (its paths made absolute,
    since the copy lives elsewhere)."""
    out.mkdir(parents=True, exist_ok=True)
    registry = out / "registry"
    first = yaml.safe_load(demo_spec.read_text(encoding="utf-8"))
    _absolute(first, demo_spec.parent)
    first["name"] = "demo-v2"
    first["lineage"] = {"dir": str(registry), "carry_tolerance": 0.03}
    first["protect"][0]["budget"] = 0.05
    first["report"] = {**first.get("report", {}), "dir": str(out / "v2")}
    second = yaml.safe_load(cycle2_spec.read_text(encoding="utf-8"))
    _absolute(second, cycle2_spec.parent)
    second["lineage"]["dir"] = str(registry)
    second["report"] = {**second.get("report", {}), "dir": str(out / "v3")}
    paths = out / "spec-v2.yaml", out / "spec-v3.yaml"
    for path, spec in zip(paths, (first, second)):
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return paths


def _absolute(spec: dict, base: Path) -> None:
    for key, value in spec.get("data", {}).items():
        spec["data"][key] = str((base / value).resolve())
    ckpt = spec.get("model", {}).get("checkpoint")
    if ckpt:
        spec["model"]["checkpoint"] = str((base / ckpt).resolve())
    lin = spec.get("lineage")
    if lin and "dir" in lin:
        lin["dir"] = str((base / lin["dir"]).resolve())


def accuracy_table(v3_result: dict) -> list[tuple[str, list[float | None]]]:
    """Per class, held-out accuracy of v1 (the origin), v2 (release 1) and v3, on the held-out split, from the
    second cycle's result.json (which evaluated every ancestor on it)."""
    acc = v3_result["lineage"]["accuracy"]
    models = [*[a["label"] for a in v3_result["lineage"]["ancestors"]], "new"]
    return [(cls, [acc[m].get(cls) for m in models]) for cls in v3_result["classes"]]
