"""A world's recipe: which source, which target, how many images per split, and how v1 is trained. Its
digest identifies a built world, so a changed recipe is never mistaken for a built one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..progress import interactive_default
from .sources import DEFAULT_SOURCE, get_source

#: Bump when the build changes what it writes for the same config (invalidates cached worlds).
WORLD_FORMAT = 1
SPLITS = ("base", "protected", "target", "validation", "heldout")


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the world's content. Its digest keys the cache."""

    seed: int = 0
    target: str = "dog"
    heldout_per_class: int = 400  # a certificate at a 3-point tolerance needs several hundred per class
    validation_per_class: int = 100
    base_per_class: int = 500  # protected classes in base-train (before the mirror top-up)
    target_in_base: int = 100  # dog in base-train: v1 dog ~0.3, where 450 dogs give ~0.68 (the headroom)
    store_min_per_class: int = 500  # protected store floor, reached with mirror images where needed
    target_positives: int | None = None  # dog images in target-train; None: every remaining one
    target_negatives_per_class: int = 40  # negatives in target-train, from base-train of each other class
    near_duplicate: float = 0.12  # relative L2 distance under which two images of a class count as one
    templates: tuple[str, ...] = ("a photo of a {}.",)
    arch: str = "safespec-mini-vit"
    steps: int = 1600  # ~11 epochs: v1 fits base-train (see safespec/demo/world.py)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 160
    # torch's CPU threads while v1 trains: part of the recipe, because the thread count changes how the
    # kernels split their sums, and so v1's bits
    threads: int = 2
    tau: float = 0.05
    source: str = DEFAULT_SOURCE  # the data set, a key of SOURCES
    # a second class starved in v1's training data, for a lineage's second cycle (`demo --cycles 2`): only
    # second_in_base of its images go to base-train, the rest to target2.csv (its own target set)
    second_target: str | None = None
    second_in_base: int = 100

    def __post_init__(self):
        classes = get_source(self.source).classes  # an unknown source is a DataError here
        if self.target not in classes:
            raise DataError(
                f"world: unknown target class {self.target!r} for source {self.source!r} "
                f"(expected one of {', '.join(classes)})"
            )
        for f in (
            "heldout_per_class",
            "validation_per_class",
            "base_per_class",
            "target_in_base",
            "steps",
            "batch_size",
            "threads",
        ):
            if getattr(self, f) < 1:
                raise DataError(f"world: {f} must be at least 1 (got {getattr(self, f)})")
        if self.second_target is not None and (self.second_target not in classes or self.second_target == self.target):
            raise DataError(
                f"world: second_target {self.second_target!r} must be a class of {self.source!r} other than the target"
            )
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise DataError("world: each template needs exactly one '{}' placeholder")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["templates"] = list(self.templates)
        if d["source"] == DEFAULT_SOURCE:
            del d["source"]  # the digest (and world.json) of a demo world is what it was before sources existed
        if d["second_target"] is None:  # likewise for a world without a second target
            del d["second_target"], d["second_in_base"]
        if d["threads"] == 1:  # and for one thread, what every world was trained with before threads joined
            del d["threads"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorldConfig:
        d = dict(d)
        d["templates"] = tuple(d.get("templates", ("a photo of a {}.",)))
        d.setdefault("threads", 1)  # written before threads joined the recipe: v1 trained on one
        return cls(**d)

    def digest(self) -> str:
        blob = json.dumps({"format": WORLD_FORMAT, "config": self.to_dict()}, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    @property
    def classes(self) -> tuple[str, ...]:
        """The source's class names, in label order."""
        return get_source(self.source).classes

    @property
    def protected(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c != self.target)


def _label(config: WorldConfig) -> str:
    """How logs and v1's metadata name the world ("demo world" for the default source, as before sources)."""
    return "demo world" if config.source == DEFAULT_SOURCE else f"{config.source} world"


def _show(progress: bool) -> bool:
    """A live bar only for a person at a terminal; logs and CI get sparse lines instead."""

    return progress and interactive_default()
