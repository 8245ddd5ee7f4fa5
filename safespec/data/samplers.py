"""The class-balanced samplers of a training step, with their state for resume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DataError


# ------------------------------------------------------------------------------------------ samplers
class _Cycle:
    """Walks a pool of indices in random permutations, one full pass before any repeat.

    Every stored image gets used; when a permutation runs out in the middle of a draw, the images already
    drawn in that draw go to the end of the next permutation so that one draw has no duplicates whenever
    the pool is large enough."""

    def __init__(self, pool: np.ndarray):
        self.pool = np.asarray(pool, dtype=np.int64)
        self.perm = np.empty(0, dtype=np.int64)
        self.cursor = 0

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out: list[np.ndarray] = []
        need = n
        while need > 0:
            if self.cursor >= len(self.perm):
                perm = rng.permutation(self.pool)
                if out:
                    taken = np.isin(perm, np.concatenate(out))
                    perm = np.concatenate([perm[~taken], perm[taken]])
                self.perm, self.cursor = perm, 0
            k = min(need, len(self.perm) - self.cursor)
            out.append(self.perm[self.cursor : self.cursor + k])
            self.cursor += k
            need -= k
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def state(self) -> dict:
        return {"size": len(self.pool), "perm": self.perm.tolist(), "cursor": int(self.cursor)}

    def load(self, st: Mapping[str, Any], what: str) -> None:
        perm = np.asarray(st["perm"], dtype=np.int64)
        if int(st["size"]) != len(self.pool) or (len(perm) and not np.array_equal(np.sort(perm), self.pool)):
            raise DataError(
                f"sampler state does not match the data ({what}: the state was written for "
                f"{int(st['size'])} images, the data has {len(self.pool)}); resume with the same data"
            )
        self.perm, self.cursor = perm, int(st["cursor"])


def _rng_state(rng: np.random.Generator) -> dict:
    return dict(rng.bit_generator.state)


def _check_rng_state(st: Any) -> dict:
    if not isinstance(st, Mapping) or st.get("bit_generator") != "PCG64":
        raise DataError("sampler state is not a PCG64 generator state; resume with a state written by safespec")
    return dict(st)


class ProtectedSampler:
    """Class-balanced protected batches: ``classes_per_step`` classes drawn at random each step (without
    replacement), ``per_class`` images of each. The per-step cost is fixed however many classes are
    protected (364 on Places365), and cycling through a per-class permutation uses every stored image."""

    def __init__(
        self,
        labels: np.ndarray,
        class_ids: Sequence[int],
        classes_per_step: int,
        per_class: int,
        seed: int = 0,
        *,
        class_names: Sequence[str] | None = None,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        self.class_ids = np.asarray(sorted(set(int(c) for c in class_ids)), dtype=np.int64)
        if len(self.class_ids) == 0:
            raise DataError("protected sampler: no protected classes")
        if classes_per_step < 1 or per_class < 1:
            raise DataError(
                f"protected sampler: classes_per_step ({classes_per_step}) and per_class "
                f"({per_class}) must be at least 1"
            )
        self.k = min(int(classes_per_step), len(self.class_ids))
        self.n = int(per_class)
        self.cycles: dict[int, _Cycle] = {}
        for c in self.class_ids:
            pool = np.flatnonzero(labels == c)
            if len(pool) == 0:
                name = class_names[c] if class_names is not None else f"class {c}"
                raise DataError(
                    f"protected store: no images of protected class {name!r}; every protected class needs stored images"
                )
            self.cycles[int(c)] = _Cycle(pool)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, drawn_classes)``; ``indices[j*n:(j+1)*n]`` are images of ``drawn_classes[j]``."""
        drawn = self.rng.choice(self.class_ids, size=self.k, replace=False)
        idx = np.concatenate([self.cycles[int(c)].take(self.n, self.rng) for c in drawn])
        return idx, drawn.astype(np.int64)

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "classes": {str(c): cy.state() for c, cy in self.cycles.items()}}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        if set(st["classes"]) != {str(c) for c in self.cycles}:
            raise DataError("sampler state does not match the data: it was written for other protected classes")
        for c, cy in self.cycles.items():
            cy.load(st["classes"][str(c)], f"class {c}")
        self.rng.bit_generator.state = _check_rng_state(st["rng"])


class TargetSampler:
    """Target batches with a fixed share of target-class positives; the rest are negatives."""

    def __init__(self, labels: np.ndarray, target_index: int, batch_size: int, positive_fraction: float, seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if not 0.0 < positive_fraction <= 1.0:
            raise DataError(f"target sampler: positive_fraction {positive_fraction} must be in (0, 1]")
        self.n_pos = max(1, round(batch_size * positive_fraction))
        self.n_neg = max(0, int(batch_size) - self.n_pos)
        pos, neg = np.flatnonzero(labels == target_index), np.flatnonzero(labels != target_index)
        if len(pos) == 0:
            raise DataError("target data: no images of the target class; the target split needs positives")
        if self.n_neg and len(neg) == 0:
            raise DataError("target data: no negatives (images of other classes); the target split needs both")
        self.pos, self.neg = _Cycle(pos), _Cycle(neg)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(positive indices, negative indices)`` into the target split."""
        pos = self.pos.take(self.n_pos, self.rng)
        neg = self.neg.take(self.n_neg, self.rng) if self.n_neg else np.empty(0, dtype=np.int64)
        return pos, neg

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "pos": self.pos.state(), "neg": self.neg.state()}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        self.pos.load(st["pos"], "target positives")
        self.neg.load(st["neg"], "target negatives")
        self.rng.bit_generator.state = _check_rng_state(st["rng"])
