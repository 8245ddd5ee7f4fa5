"""The two-cycle demo (``safespec demo --cycles 2``): a lineage v1 -> v2 -> v3 on the lineage world, where v1
is weak on two classes: dog (as in the demo world) and bird (only 100 of its images in v1's training data).
Cycle 1 is the demo spec itself, registered in a lineage: it improves dog. Cycle 2 (``specs/demo-cycle2.yaml``)
improves bird from its held-back images while dog's new accuracy is carried, and every class's drift against
v1 and v2 stays within its budget (docs/lineage.md).

The lineage world is its own folder (out/world-lineage/), so the demo world, and the one-cycle demo, stay
exactly as they are.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import WorldConfig

#: The lineage world: the demo world's recipe with bird starved too; its rest becomes target2.csv.
LINEAGE_WORLD = WorldConfig(second_target="bird", second_in_base=100)


def lineage_specs(demo_spec: Path, cycle2_spec: Path, out: Path) -> tuple[Path, Path]:
    """The two cycles' spec files under ``out``. Cycle 1 is the demo spec with its data and v1 taken from the
    second cycle's world, a lineage section and its own run directory; cycle 2 is the shipped second-cycle
    spec as written. Paths are made absolute, since the copies live elsewhere."""
    out.mkdir(parents=True, exist_ok=True)
    registry = out / "registry"
    second = yaml.safe_load(cycle2_spec.read_text(encoding="utf-8"))
    _absolute(second, cycle2_spec.parent)
    world = Path(second["data"]["heldout"]).parent
    first = yaml.safe_load(demo_spec.read_text(encoding="utf-8"))
    _absolute(first, demo_spec.parent)
    for split in ("protected", "target", "validation", "heldout"):
        first["data"][split] = str(world / f"{split}.csv")
    first["model"]["checkpoint"] = str(world / "models" / "v1.safetensors")
    first["name"] = "demo-cycle1"
    first["lineage"] = {"dir": str(registry), "carry_tolerance": second["lineage"].get("carry_tolerance", 0.03)}
    first["protect"][0]["budget"] = second["protect"][0].get("budget")
    first["report"] = {**first.get("report", {}), "dir": str(out / "v2")}
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
