"""Scale-out on torchrun: one process per device, DistributedDataParallel for the gradients.

``torchrun --nproc_per_node N -m safespec run SPEC`` starts N copies of the same run; :func:`setup` joins
them into one process group (gloo on CPU, NCCL on GPUs). The design keeps every rank's *decisions*
identical without extra protocol:

* every rank draws the same global batch from the same seeded samplers and encodes only its own
  contiguous shard of it (so no image is encoded twice); the features are then all-gathered, so the
  per-class constraint sums and counts, the moving averages u_k, the multipliers and the target
  objective are computed from the whole batch, identically on every rank (the all-gathered features
  carry the same information as all-reduced sums and counts, and also serve the target objective);
* the gather's backward hands each rank the gradient of its own shard (scaled by N, since DDP then
  averages), so the summed gradient equals the single-process one up to float summation order;
* evaluation splits a data set into contiguous shards and gathers the predictions trimmed to each shard's
  true length, so per-class counts are exact (no padded or duplicated tail samples);
* only rank 0 writes files; cache look-ups are decided on rank 0 and broadcast, so that every rank takes
  the same path through the collective operations.

Without torchrun (``WORLD_SIZE`` unset or 1) every function here is the identity and nothing is imported
from ``torch.distributed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Context", "context", "setup", "teardown"]


@dataclass(frozen=True)
class Context:
    """This process's place in the run: its rank among ``world`` processes (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and the caches."""
        return self.rank == 0

    # -- sharding
    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``n`` that ``rank`` handles: contiguous, sizes differing by at most one."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def sizes(self, n: int) -> list[int]:
        return [hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.world))]

    # -- collectives
    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The (n, ...) tensor whose rows ``bounds(n)`` are ``local`` on each rank, on every rank, with a
        backward that returns this rank's rows of the gradient times ``world`` (see the module notes)."""
        if not self.active:
            return local
        return _GatherRows.apply(local, self, n)

    def gather_numpy(self, local: Any, n: int) -> Any:
        """Concatenate each rank's rows of a numpy array (in rank order, exactly ``n`` rows)."""
        if not self.active:
            return local
        t = torch.as_tensor(np.ascontiguousarray(local))
        return _all_gather_padded(t, self.sizes(n)).numpy()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (gradients averaged across ranks), or as it is."""
        if not self.active:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def _all_gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    m = max(sizes)
    pad = t.new_zeros((m, *t.shape[1:]))
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, ctx_dist: Context, n: int):
        ctx.bounds = ctx_dist.bounds(n)
        ctx.world = ctx_dist.world
        return _all_gather_padded(local.detach(), ctx_dist.sizes(n))

    @staticmethod
    def backward(ctx, g):
        # every rank computed the same loss from the same gathered rows, so its gradient for its own rows
        # is already complete; DDP averages over ranks, hence the factor
        lo, hi = ctx.bounds
        return g[lo:hi] * ctx.world, None, None


_CONTEXT = Context()


def context() -> Context:
    """The current process's :class:`Context` (single-process unless :func:`setup` joined a group)."""
    return _CONTEXT


def setup(log: Callable[[str], Any] | None = None) -> Context:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a no-op when not launched by torchrun."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or _CONTEXT.active:
        return _CONTEXT
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("SAFESPEC_DIST_BACKEND", "") != "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _CONTEXT = Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    if log is not None and _CONTEXT.is_main:
        log(f"distributed: {_CONTEXT.world} processes ({'nccl' if cuda else 'gloo'})")
    return _CONTEXT


def teardown() -> None:
    global _CONTEXT
    if _CONTEXT.active:
        if dist.is_initialized():
            dist.destroy_process_group()
    _CONTEXT = Context()
