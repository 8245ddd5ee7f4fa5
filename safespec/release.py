"""The release stage of a cycle in a lineage: check that the cycle continues the lineage's latest release,
describe the lineage in result.json, and register a run that may be released (docs/lineage.md).

A run is registered only when it is a release (its verdict is certified and its target reached its goal)
and the spec does not say ``lineage.register: false``; anything else leaves the registry as it was. The
registration happens under the registry's lock, between writing the run's outputs and marking the run
complete: a registration that fails (the lineage moved on meanwhile, a full disk) fails the run, whose
outputs are then removed, so no run directory claims a release the registry does not hold.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunError
from .lineage import CertifiedCapability, Registry
from .model import LoadedModel, save_checkpoint
from .plan import Plan
from .result import meets
from .rundir import RunDir, utc_now


def check_parent(plan: Plan, old: LoadedModel) -> None:
    """A cycle in a lineage starts from its latest release (or, for the first, from anything)."""
    lin = plan.lineage
    if lin is None or lin.latest is None:
        return
    if old.digest != lin.latest.digest:
        raise RunError(
            f"model: the old model ({old.digest}) is not the lineage's latest release, {lin.latest.label} "
            f"({lin.latest.digest}); continue the lineage from it with model.from: lineage"
        )


def budget_block(plan: Plan, labels: np.ndarray, accuracy: dict[str, np.ndarray], budgets: list[dict]) -> list[dict]:
    """result.json's lineage.budgets: per budgeted capability, its accuracy under every ancestor and the new
    model on this cycle's held-out split, and the budget used (the largest drop against any) and left.
    ``accuracy`` maps each ancestor's label (and 'new') to its per-image correctness; ``budgets`` are the
    budget certificates' dicts."""
    out = []
    by_name = {b["name"]: b for b in budgets}
    for c in plan.budgeted:
        assert c.budget is not None
        mask = np.isin(labels, c.class_indices)
        acc = {k: (float(v[mask].mean()) if mask.any() else None) for k, v in accuracy.items()}
        new = acc.get("new")
        drops = [a - new for k, a in acc.items() if k != "new" and a is not None and new is not None]
        used = max([0.0, *drops]) if new is not None else None
        cert = by_name[f"{c.name} (budget)"]
        out.append(
            {
                "capability": c.name,
                "budget": float(c.budget),
                "status": cert["status"],
                "against": cert.get("against"),
                "accuracy": acc,
                "used": None if used is None else float(used),
                "left": None if used is None else float(c.budget - used),
            }
        )
    return out


def per_class_accuracy(plan: Plan, labels: np.ndarray, accuracy: dict[str, np.ndarray]) -> dict[str, dict]:
    """result.json's lineage.accuracy: every model of the lineage (each ancestor, then 'new'), its held-out
    accuracy per class on this cycle's split, for the report's chart of each class across releases."""
    out: dict[str, dict] = {}
    for label, correct in accuracy.items():
        out[label] = {
            name: (float(correct[labels == k].mean()) if (labels == k).any() else None)
            for k, name in enumerate(plan.classes)
        }
    return out


def lineage_block(plan: Plan, budgets: list[dict], accuracy: dict[str, dict]) -> dict[str, Any] | None:
    """result.json's lineage block before registration (``release`` is filled in by :func:`registering`)."""
    lin = plan.lineage
    if lin is None:
        return None
    return {
        "accuracy": accuracy,
        "dir": lin.dir,
        "ancestors": [{"id": a.id, "label": a.label, "digest": a.digest} for a in lin.ancestors],
        "carried": [
            {"name": c.name, "classes": list(c.classes), "from_release": c.carried_from}
            for c in plan.constraints
            if c.carried_from is not None
        ],
        "budgets": budgets,
        "release": None,
        "registration": "not registered: the run did not finish",
    }


def _releasable(plan: Plan, result: dict) -> str | None:
    """Why this run must not be registered, or None."""
    if not plan.lineage or not plan.lineage.register:
        return "not registered: lineage.register is false"
    if result["verdict"] != "certified":
        return "not registered: the verdict is not certified"
    if not result["target"]["goal_met"]:
        return "not registered: the target did not reach its goal"
    return None


@contextlib.contextmanager
def registering(
    plan: Plan, old: LoadedModel, result: dict, rd: RunDir, *, spec_text: str, new_model: Path, log: Callable
) -> Iterator[None]:
    """Around writing the run's outputs: when the run is a release, hold the registry's lock, number the
    release in ``result`` before the outputs are written, and register it after they are. Otherwise only
    say in ``result`` why it is not registered, and leave the registry alone."""
    lin = plan.lineage
    if lin is None:
        yield
        return
    why = _releasable(plan, result)
    if why is not None or not rd.writes:
        result["lineage"]["registration"] = why or "not registered: not the main process"
        yield
        return
    reg = Registry(Path(lin.dir))
    with reg.locked():
        latest = reg.latest
        if latest is not None and latest.digest != old.digest:
            raise RunError(
                f"{lin.dir}: the lineage moved on while this run worked (its latest is now {latest.label}, "
                f"{latest.digest}); rerun the cycle from it"
            )
        rid = len(reg.releases) or 1  # an empty registry gets the origin (0) first
        digest = result["provenance"]["new_model"]["digest"]
        result["lineage"]["release"] = {"id": rid, "digest": digest}
        result["lineage"]["registration"] = f"registered as release {rid} of {lin.dir}"
        yield  # the caller writes result.json and the report here
        if latest is None:
            _add_origin(reg, plan, old, result)
        reg.add(
            model_file=new_model,
            digest=digest,
            parent=old.digest,
            name=plan.name,
            target=plan.objective.target_class,
            classes=plan.classes,
            certified=[
                CertifiedCapability(c["name"], tuple(c["classes"]))
                for c in result["capabilities"]
                if "against" not in c and meets(c["status"], result["require"])
            ],
            accuracy=_accuracy(result, "new_accuracy"),
            created=utc_now(),
            run_files={f: rd.path / f for f in ("result.json", "report.html", "junit.xml")},
            spec_text=spec_text,
        )
    log(f"registered release {rid} in {lin.dir}")


def _add_origin(reg: Registry, plan: Plan, old: LoadedModel, result: dict) -> None:
    """The lineage's release 0: the first cycle's old model, so later budgets can be certified against it."""
    with tempfile.TemporaryDirectory(dir=reg.path) as tmp:
        path = Path(tmp) / "origin.safetensors"
        digest = save_checkpoint(old.model, path, {"lineage": "origin"})
        if digest != old.digest:
            raise RunError(f"internal error: the saved origin's digest {digest} is not the old model's {old.digest}")
        reg.add(
            model_file=path,
            digest=digest,
            parent=None,
            name="origin",
            target=None,
            classes=plan.classes,
            certified=[],
            accuracy=_accuracy(result, "old_accuracy"),
            created=utc_now(),
        )


def _accuracy(result: dict, key: str) -> dict[str, float]:
    return {c["class"]: c[key] for c in result.get("per_class", []) if c.get(key) is not None}
