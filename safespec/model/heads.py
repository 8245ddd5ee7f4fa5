"""Task-dependent heads (method.md section 3): a low-rank adapter per head on the text projection, and the
grouped kernel that applies each row's own head without materialising one projection per row."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

# ------------------------------------------------------------------------------------------ heads
_SMALL_GROUP = 8  # heads with fewer rows than this share gathered batched matmuls
_GATHER_BLOCK = 64  # rows per gathered matmul: bounds the (rows x width x rank) gathered copy of A


class _SortedGroups(torch.autograd.Function):
    """``base + (h_i @ A[k_i]) @ B[k_i]`` per row, one segment of rows of the same head(s) at a time.

    ``order`` sorts the rows by head, or is None when they already are (the trainer's text batches:
    target captions, then negatives; class prompts class by class), in which case no row is gathered or
    scattered and each segment is added into the output in place. A segment is either all rows of one
    frequently used head (two matmuls) or a run of rows of rarely used heads (their factors gathered per
    row). The backward is written by hand so that every gradient is written once: autograd of the same ops
    zero-fills and scatters a full-size gradient of ``h`` and ``A`` per slice, index and concatenation,
    which cost as much as the projection itself.
    """

    @staticmethod
    def forward(ctx, h, A, B, base, order, ids_sorted, segments, inplace, inverse):
        if inplace:
            ctx.mark_dirty(base)
        out, hs, u = _grouped_forward(h, A, B, base, order, ids_sorted, segments, inplace, inverse)
        ctx.save_for_backward(hs, u, A, B, order, ids_sorted)
        ctx.segments = segments
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hs, u, A, B, order, ids_sorted = ctx.saved_tensors
        g = g.contiguous()
        gs = g if order is None else g.index_select(0, order)
        need_h, need_a, need_b = ctx.needs_input_grad[:3]
        grad_hs = torch.empty_like(hs)
        grad_a = torch.zeros_like(A) if need_a else None
        grad_b = torch.zeros_like(B) if need_b else None
        for s, e, k in ctx.segments:
            gk = gs[s:e]
            if k >= 0:  # each frequent head owns exactly one segment: its gradient is written, not added
                t = gk @ B[k].T
                if grad_b is not None:
                    torch.mm(u[s:e].T, gk, out=grad_b[k])
                if grad_a is not None:
                    torch.mm(hs[s:e].T, t, out=grad_a[k])
                torch.mm(t, A[k].T, out=grad_hs[s:e])
            else:
                ks = ids_sorted[s:e]
                t = torch.bmm(gk.unsqueeze(1), B.index_select(0, ks).transpose(1, 2))  # (rows, 1, rank)
                if grad_b is not None:
                    grad_b.index_add_(0, ks, u[s:e].unsqueeze(2) * gk.unsqueeze(1))
                if grad_a is not None:
                    grad_a.index_add_(0, ks, hs[s:e].unsqueeze(2) * t)
                grad_hs[s:e] = torch.bmm(t, A.index_select(0, ks).transpose(1, 2)).squeeze(1)
        if not need_h:
            grad_h = None
        elif order is None:
            grad_h = grad_hs
        else:
            grad_h = torch.empty_like(grad_hs).index_copy_(0, order, grad_hs)
        return grad_h, grad_a, grad_b, g if ctx.needs_input_grad[3] else None, None, None, None, None, None


def _grouped_forward(h, A, B, base, order, ids_sorted, segments, inplace, inverse):
    """The forward of :class:`_SortedGroups`; also run alone when no gradient is wanted (evaluation), which
    spares the autograd bookkeeping. Returns the output and what the backward needs (sorted h, h @ A).

    Rows in head order are added into ``base`` where they lie. Sorted rows go to a buffer that each segment
    writes once (no zero-fill), then are added to ``base`` gathered back into the caller's order (in place
    when ``base`` is the caller's temporary): a gather parallelises where a scattering ``index_add`` does not."""
    hs = h if order is None else h.index_select(0, order)
    u = hs.new_empty(hs.shape[0], A.shape[2])
    ys = (base if inplace else base.clone()) if order is None else hs.new_empty(hs.shape[0], B.shape[2])
    for s, e, k in segments:
        if k >= 0:
            torch.mm(hs[s:e], A[k], out=u[s:e])
            if order is None:
                ys[s:e].addmm_(u[s:e], B[k])
            else:
                torch.mm(u[s:e], B[k], out=ys[s:e])
        else:
            ks = ids_sorted[s:e]
            u[s:e] = torch.bmm(hs[s:e].unsqueeze(1), A.index_select(0, ks)).squeeze(1)
            low = torch.bmm(u[s:e].unsqueeze(1), B.index_select(0, ks)).squeeze(1)
            if order is None:
                ys[s:e] += low
            else:
                ys[s:e] = low
    if order is None:
        return ys, hs, u
    back = ys.index_select(0, inverse)  # each row's correction, back in the caller's order
    return (base.add_(back) if inplace else base + back), hs, u


def _segments(heads: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, head) over rows sorted by head; head -1 marks a run of rarely used heads' rows."""
    out: list[tuple[int, int, int]] = []
    start, run = 0, None
    for k, c in zip(heads, counts):
        if c >= _SMALL_GROUP:
            if run is not None:
                out.append((run, start, -1))
                run = None
            out.append((start, start + c, k))
        else:
            if run is not None and start + c - run > _GATHER_BLOCK:
                out.append((run, start, -1))
                run = None
            if run is None:
                run = start
        start += c
    if run is not None:
        out.append((run, start, -1))
    return out


class _Plan(NamedTuple):
    """How one sequence of head ids is grouped: the sort (None when already in head order), the sorted ids,
    each distinct head with its row count, and the segments :class:`_SortedGroups` runs."""

    order: torch.Tensor | None
    inverse: torch.Tensor | None  # the permutation that undoes ``order``
    ids_sorted: torch.Tensor
    heads: list[int]
    counts: list[int]
    segments: list[tuple[int, int, int]]


@functools.lru_cache(maxsize=32)
def _plan(ids_bytes: bytes) -> _Plan:
    """The grouping of head ids given as int64 bytes, planned in numpy (a few small torch ops cost as much
    as the low-rank matmuls themselves) and kept by value: a trainer routes the same few sequences (the
    class prompts, captions then negatives) every step, and the plan was most of a call's host time."""
    ids = np.frombuffer(ids_bytes, dtype=np.int64)
    order_np = None if (np.diff(ids) >= 0).all() else np.argsort(ids, kind="stable")
    ids_np = ids if order_np is None else ids[order_np]
    starts = np.flatnonzero(np.r_[True, ids_np[1:] != ids_np[:-1]])
    heads, counts = ids_np[starts].tolist(), np.diff(np.r_[starts, ids.shape[0]]).tolist()
    inverse = None
    if order_np is not None:
        inverse = np.empty_like(order_np)
        inverse[order_np] = np.arange(order_np.shape[0])
    return _Plan(
        order=None if order_np is None else torch.from_numpy(order_np),
        inverse=None if inverse is None else torch.from_numpy(inverse),
        ids_sorted=torch.from_numpy(ids_np.copy()),
        heads=heads,
        counts=counts,
        segments=_segments(heads, counts),
    )


def grouped_low_rank(
    h: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    head_ids: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``base[i] + (h_i @ A[k_i]) @ B[k_i]`` for every row i (``base`` defaults to zeros), computed per head.

    The grouping is planned on the host from ``head_ids`` (pass them on the CPU, as safespec does, and no
    device synchronisation happens here). Rows already in head order are used where they lie; otherwise
    they are sorted once. When every head has the same number of rows (class prompts: each class has the
    same templates) one batched matmul does all heads; otherwise each frequently used head (the target's
    captions, the negatives) gets two matmuls and rarely used heads' rows share gathered ones
    (:class:`_SortedGroups`). Nothing of size (rows x width x embed) is ever built, and ``B = 0`` returns
    ``base`` bit for bit. ``inplace``: ``base`` is a temporary of the caller's (the plain projection) and may
    be updated in place and returned, which saves a copy of it.
    """
    n = h.shape[0]
    if head_ids.shape != (n,):
        raise ValueError(f"head_ids must have shape ({n},), got {tuple(head_ids.shape)}")
    if base is None:
        base = h.new_zeros(n, B.shape[-1])
    if n == 0:
        return base
    plan = _plan(head_ids.detach().to("cpu", torch.long).numpy().tobytes())
    u_l, c_l = plan.heads, plan.counts
    if u_l[0] < 0 or u_l[-1] >= A.shape[0]:
        raise ValueError(f"head ids must lie in [0, {A.shape[0]}), got {u_l[0]}..{u_l[-1]}")
    dev = h.device
    order = None if plan.order is None else plan.order.to(dev, non_blocking=True)
    inverse = None if plan.inverse is None else plan.inverse.to(dev, non_blocking=True)
    ids_sorted = plan.ids_sorted
    g = len(u_l)
    if g == 1:
        return base + (h @ A[u_l[0]]) @ B[u_l[0]]
    m = c_l[0]
    if all(c == m for c in c_l):
        uniq = torch.tensor(u_l).to(dev, non_blocking=True)  # a blocking copy would sync the stream
        Au, Bu = A.index_select(0, uniq), B.index_select(0, uniq)
        hs = h if order is None else h.index_select(0, order)
        ys = torch.bmm(torch.bmm(hs.view(g, m, -1), Au), Bu).reshape(n, -1)
        return base + (ys if inverse is None else ys.index_select(0, inverse)).to(base.dtype)
    # the hand-written backward runs in h's dtype: keep autocast (which would recast each matmul) out
    args = (
        h,
        A.to(h.dtype),
        B.to(h.dtype),
        base.to(h.dtype),
        order,
        ids_sorted.to(dev, non_blocking=True),
        plan.segments,
        inplace and base.dtype == h.dtype,
        inverse,
    )
    with torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else contextlib.nullcontext():
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
            return _SortedGroups.apply(*args).to(base.dtype)
        return _grouped_forward(*args)[0].to(base.dtype)


def naive_routed_projection(
    h: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, head_ids: torch.Tensor
) -> torch.Tensor:
    """The paper's reference routing, ``h_i @ (W + A_k B_k)`` with a per-sample matrix. Kept only as the
    numerical reference for tests and the cost baseline in ``bench/heads.py``; never used for training."""
    per_sample = W.unsqueeze(0) + torch.bmm(A[head_ids], B[head_ids])  # (N, width, embed)
    return torch.bmm(h.unsqueeze(1), per_sample).squeeze(1)


class LowRankHeads(nn.Module):
    """One low-rank correction ``A_k B_k`` of the text projection per head (classes, then negatives)."""

    def __init__(
        self,
        num_heads: int,
        width: int,
        embed_dim: int,
        rank: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_heads < 1 or rank < 1:
            raise ValueError(f"need at least one head of rank >= 1 (got {num_heads} heads, rank {rank})")
        g = torch.Generator().manual_seed(int(seed))
        bound = width**-0.5  # LoRA's scale: h @ A has the magnitude of h, so B learns at the rate of W
        a = (torch.rand(num_heads, width, rank, generator=g) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(device=device, dtype=dtype or torch.float32))
        self.B = nn.Parameter(torch.zeros(num_heads, rank, embed_dim, device=device, dtype=dtype or torch.float32))

    @property
    def num_heads(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    def forward(
        self, h: torch.Tensor, head_ids: torch.Tensor, base: torch.Tensor | None = None, *, inplace: bool = False
    ) -> torch.Tensor:
        """``base + (h @ A_k) @ B_k`` per row (see :func:`grouped_low_rank`)."""
        return grouped_low_rank(h, self.A.to(h.dtype), self.B.to(h.dtype), head_ids, base, inplace=inplace)
