"""Write a spec for a built demo world (tests only): the demo's cycle, sized for the small world."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_world_spec(
    folder: Path,
    world,
    *,
    method: str = "penalty",
    steps: int = 120,
    tolerance: float = 0.15,
    out: Path | None = None,
    **optimize,
) -> Path:
    """The small world has 40 held-out images per class; a 3-point tolerance cannot be certified at that
    size (see docs/statistics.md), so tests use a wider one that still catches real forgetting."""
    m = world.manifests
    spec = {
        "safespec": 1,
        "name": "small-world",
        "description": "test cycle on the small world",
        "model": {
            "arch": world.config.arch,
            "checkpoint": str(world.v1_checkpoint),
            "heads": {"enabled": True, "rank": 4},
            "device": "cpu",
        },
        "classes": {"names": list(world.classes), "templates": list(world.config.templates)},
        "data": {k: str(m[k]) for k in ("protected", "target", "validation", "heldout")},
        "protect": [{"classes": "others", "each": True, "tolerance": tolerance}],
        "target": {"class": world.config.target, "goal": {"min_improvement": 0.05}},
        "optimize": {
            "method": method,
            "objective": "ce",
            "steps": steps,
            "lr": 2e-3,
            "warmup_steps": 10,
            "eval_every": 20,
            "checkpoint_every": 20,
            "seed": 0,
            "batch": {"target": 32, "protected_classes": 9, "per_class": 6},
            **optimize,
        },
        "report": {"dir": str(out or folder / "run")},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
