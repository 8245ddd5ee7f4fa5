"""Cost of task-dependent heads on the text projection (method.md §3).

Compares, at the paper's text batch (262 prompts = 128 target captions + 128 negative captions + 6 class
prompts, width 512, rank 32, embed 512) on 2 CPU threads:

- ``plain``:   ``h @ W``, the projection without heads (the floor);
- ``routed``:  ``h @ W + (h @ A_k) @ B_k`` grouped by head (safespec's implementation);
- ``naive``:   ``h_i @ (W + A_k B_k)`` with a per-sample (width x embed) matrix (the paper's reference code).

Goal: ``routed`` costs at most 2x ``plain`` (``goal_routed_at_most_2x_plain``, per thread count), with the
rows in head order (as safespec's trainer passes them) and shuffled. Forward and forward+backward are both
timed (training needs the backward). A second scenario routes the same batch through 262 distinct heads (Places365-like: many
classes, few prompts each), the worst case for grouping.

Run: ``python bench/heads.py`` (prints JSON).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

import torch

from safespec.model import grouped_low_rank, naive_routed_projection


def _time(fn: Callable[[], object], *, min_runs: int = 20, min_seconds: float = 1.5) -> float:
    """Best time of ``fn`` in milliseconds (after a warm-up). The minimum, not the median: on a shared
    machine other processes only ever add time. With one thread the clock is the thread's CPU time, which
    also leaves out the time the thread spent preempted (runs of several ms rarely escape preemption on a
    loaded 2-core machine); with more threads it has to be the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = clock()
        fn()
        times.append(clock() - t)
        if len(times) >= 2000:
            break
    return 1000.0 * min(times)


def _scenario(
    head_ids: torch.Tensor, *, width: int, embed: int, rank: int, num_heads: int, naive: bool, seed: int = 0
) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = head_ids.numel()
    h = torch.randn(n, width, generator=g, requires_grad=True)
    W = torch.nn.Parameter(torch.randn(width, embed, generator=g) * width**-0.5)
    A = torch.nn.Parameter(torch.randn(num_heads, width, rank, generator=g) * width**-0.5)
    B = torch.nn.Parameter(torch.randn(num_heads, rank, embed, generator=g) * 0.01)
    grad_out = torch.randn(n, embed, generator=g)

    def plain():
        return h @ W

    def routed():  # as HeadedCLIP.project_text calls it: the plain projection is a temporary, added to in place
        return grouped_low_rank(h, A, B, head_ids, base=h @ W, inplace=True)

    def naive_fn():
        return naive_routed_projection(h, W, A, B, head_ids)

    def fwd(f):
        def run():
            with torch.no_grad():
                f()

        return run

    def fwd_bwd(f):
        params = (h, W, A, B) if f is not plain else (h, W)

        def run():
            torch.autograd.grad(f(), params, grad_out)

        return run

    with torch.no_grad():  # the grouped computation is the naive one, re-associated
        err = (routed() - naive_fn()).abs().max().item() if naive else None
    out: dict = {
        "prompts": n,
        "distinct_heads": int(head_ids.unique().numel()),
        "width": width,
        "embed": embed,
        "rank": rank,
        "forward_ms": {"plain": _time(fwd(plain)), "routed": _time(fwd(routed))},
        "forward_backward_ms": {"plain": _time(fwd_bwd(plain)), "routed": _time(fwd_bwd(routed))},
    }
    if naive:
        out["forward_ms"]["naive"] = _time(fwd(naive_fn), min_runs=3, min_seconds=1.0)
        out["forward_backward_ms"]["naive"] = _time(fwd_bwd(naive_fn), min_runs=3, min_seconds=1.0)
        out["naive_per_sample_tensor_mb"] = round(n * width * embed * 4 / 2**20, 1)
        out["max_abs_difference_routed_vs_naive"] = err
    for key in ("forward_ms", "forward_backward_ms"):
        t = out[key]
        out[key] = {k: round(v, 3) for k, v in t.items()}
        out[key.replace("_ms", "_ratio_routed_over_plain")] = round(t["routed"] / t["plain"], 2)
        if naive:
            out[key.replace("_ms", "_ratio_naive_over_plain")] = round(t["naive"] / t["plain"], 1)
    return out


def _one(threads: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        classes = 6  # BDD100K weather: 5 protected classes + the target
        target, negative = 5, classes  # head ids: the target class's head and the extra negative head
        paper = torch.cat([torch.full((128,), target), torch.full((128,), negative), torch.arange(classes)])
        perm = torch.randperm(paper.numel(), generator=torch.Generator().manual_seed(0))
        res = {
            # rows in head order, as safespec's trainer passes them (captions of the target, then negatives)
            "paper_text_batch": _scenario(
                paper.sort().values, width=512, embed=512, rank=32, num_heads=classes + 1, naive=True
            ),
            # the same rows in random order: one gather of h and one scatter of the output more
            "paper_text_batch_shuffled": _scenario(
                paper[perm], width=512, embed=512, rank=32, num_heads=classes + 1, naive=False
            ),
            "many_heads": _scenario(torch.arange(262), width=512, embed=512, rank=32, num_heads=366, naive=False),
        }
        res["goal_routed_at_most_2x_plain"] = all(
            res[k][f"{r}_ratio_routed_over_plain"] <= 2.0
            for k in ("paper_text_batch", "paper_text_batch_shuffled")
            for r in ("forward", "forward_backward")
        )
        return res
    finally:
        torch.set_num_threads(previous)


def run(threads: Sequence[int] = (2, 1)) -> dict:
    """Timings (ms, best of many runs) and ratios for the paper's text batch and a many-heads batch, per
    thread count. The load average is recorded because on a shared 2-core machine other processes stall
    2-thread parallel regions (each waits for its descheduled partner), which inflates every small op;
    the 1-thread numbers are the ones to trust when the load is above ~1."""
    out: dict = {"torch": torch.__version__, "load_average_before": list(os.getloadavg())}
    for t in threads:
        out[f"threads_{t}"] = {"clock": "thread CPU time" if t == 1 else "wall", **_one(t)}
    out["load_average_after"] = list(os.getloadavg())
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
