"""The benchmark harness at a tiny size: it runs, returns the structure RESULTS.md is rendered from, and
its ratios are positive finite numbers. No test here asserts on speed: timings belong to `make bench`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rivals import rival_logits
from world_spec import write_world_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a top-level folder, not installed
from bench import __main__ as bench_main  # noqa: E402
from bench import overhead  # noqa: E402


def _ratios(node):
    """Every number under a 'ratio' key, however deep."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from (_leaves(v) if k == "ratio" else _ratios(v))


def _leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    else:
        yield node


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check(section: str, res: dict) -> None:
    ratios = list(_ratios(res))
    assert ratios and all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in ratios), ratios
    rows = overhead.goals(section, res)
    assert rows and all(isinstance(met, bool) for *_, met in rows)
    assert overhead.markdown(section, res)
    json.dumps(res)  # what bench/results/<section>.json will hold


def test_step_overhead_and_verify_on_the_small_world(small_world, tmp_path):
    spec = write_world_spec(tmp_path, small_world, steps=30)
    steps = overhead.step_overhead(spec, warmup=1, rounds=1, per_round=2)
    assert set(steps["ratio"]) == {"penalty", "lagrangian"} and steps["optimizer_matches_trainer"]
    _check("steps", steps)

    verify = overhead.verify_throughput(spec, candidates=1, bare_repeats=1, cli=False)
    n = verify["heldout_images"]
    # an empty cache evaluates both models; with the old model cached only the candidate; then nothing
    assert verify["images_encoded"] == {"cold_cache": 2 * n, "old_model_cached": [n], "both_cached": 0}
    assert verify["second_verify_evaluates_only_candidate"] is True
    _check("verify", verify)


def test_scaling_in_protected_classes_at_a_tiny_size(monkeypatch):
    from safespec.model import prompt_tree

    monkeypatch.setattr(prompt_tree, "MIN_PROMPTS", 1)  # a tree at this size too, so its floor is timed
    real = prompt_tree._attention
    res = overhead.scaling(
        (2, 5),
        arch="safespec-micro-vit",
        classes_per_step=2,
        per_class=2,
        target_batch=4,
        images_per_class=2,
        warmup=1,
        rounds=1,
        per_round=1,
    )
    assert set(res["variants"]) == {"all_trained", "text_frozen"}
    assert all(set(v["step_ms"]) == {"2", "5"} for v in res["variants"].values())
    assert set(res["ratio"]) == set(res["ratio_text_frozen"]) == {"5_over_2"}
    floor = res["variants"]["all_trained"]["attention_floor"]
    assert (
        floor["ratio"] > 0 and floor["text_ms"]["n"] > 0 and res["variants"]["text_frozen"]["attention_floor"] is None
    )
    assert prompt_tree._attention is real  # the floor's stand-in is taken out again
    assert "The floor with every tower trained" in overhead.markdown("scaling", res)
    _check("scaling", res)


def test_re_running_one_section_keeps_the_others(tmp_path):
    """`--only` rewrites one section's JSON; RESULTS.md is rendered from every JSON present, and sections
    without JSON (or written by hand) are kept as they were."""
    results = tmp_path / "results"
    results.mkdir()
    old = (
        "# Benchmark results\n\nold preamble\n\n## " + bench_main.HEADINGS["heads"] + "\n\nheads text kept\n\n"
        "## Status against the goals (read this first)\n\nwritten by hand\n"
    )
    (results / "demo.json").write_text(
        json.dumps(
            {
                "command": "safespec run x --quiet",
                "quick": True,
                "exit_code": 1,
                "wall_s": 12.0,
                "cpu_s": 20.0,
                "peak_rss_mib": 500.0,
                "verdict": "not_certified",
                "target_goal_met": False,
                "training_seconds": 5.0,
                "methods": ["lagrangian"],
                "prediction_cache": "empty at start",
                "cpus": 2,
                "load_average_before": [0.1],
                "load_average_after": [0.2],
                "stderr_tail": [],
                "measured": {"date": "2000-01-01 00:00", "machine": "test machine", "quick": True},
            }
        )
    )
    text = bench_main.render(results, old)
    assert "heads text kept" in text and "written by hand" in text and "old preamble" not in text
    assert bench_main.HEADINGS["demo"] in text and "| 12.0 |" in text and "test machine" in text
    # generated sections in their fixed order, then what was written by hand
    assert text.index(bench_main.HEADINGS["demo"]) < text.index("heads text kept") < text.index("written by hand")


def test_frozen_tower_speedup_on_the_small_world(small_world, tmp_path):
    spec = write_world_spec(tmp_path, small_world, steps=30)
    res = overhead.frozen_towers(spec, warmup=1, rounds=1, per_round=1)
    assert set(res["step_ms"]) == {
        "all trained",
        "image frozen, encoded every step",
        "image frozen, features cached",
        "image and text frozen, cached",
    }
    assert all(v > 0 for v in res["speedup"].values())
    assert overhead.goals("frozen", res) == [] and overhead.markdown("frozen", res)
    json.dumps(res)


def test_the_prepared_gpu_script_runs_on_a_cpu_at_a_tiny_size():
    from bench import gpu

    res = gpu.run(
        arch="safespec-micro-vit",
        target_batch=4,
        classes=3,
        per_class=2,
        images_per_class=2,
        warmup=1,
        rounds=1,
        per_round=1,
        device="cpu",
    )
    assert res["device"] == "cpu" and res["precision"] == "fp32" and res["host_syncs_in_step"] is None
    r = res["ratio"]["penalty"]
    assert all(math.isfinite(v) and v > 0 for v in r.values())


def test_the_shift_frontier_is_exact_on_a_hand_made_problem():
    """Target 0. Its two images need a shift over 0.5 and over 2.0; a class-1 image flips to the target
    past 1.0, a class-2 image past 3.0. With no drop allowed the best is the first target image alone
    (shift just over 0.5); with any drop allowed, both target images at class 1's expense, class 2 kept."""
    from bench.quality import frontier_from_logits

    logits = np.array(
        [
            [0.0, 0.5, -9.0],  # target image, gap 0.5 to class 1
            [0.0, -9.0, 2.0],  # target image, gap 2.0 to class 2
            [1.0, 2.0, -9.0],  # class 1 image, target 1.0 below
            [-1.0, -9.0, 2.0],  # class 2 image, target 3.0 below
        ]
    )
    labels = np.array([0, 0, 1, 2])
    f = {r["budget_pt"]: r for r in frontier_from_logits(logits, labels, 0, budgets=(0, 100))}
    assert f[0]["target_gain"] == pytest.approx(0.5) and f[0]["worst_change"] == 0.0
    assert 0.5 <= f[0]["shift"] < 1.0  # reported to 3 decimals: just over 0.5
    assert f[100]["target_gain"] == pytest.approx(1.0) and f[100]["worst_change"] == pytest.approx(-1.0)
    assert f[100]["shift"] == pytest.approx(2.0)  # the smallest shift that gains both: class 2 is kept


def test_the_quality_harness_reports_each_method_and_the_frontier_on_the_small_world(small_world, tmp_path):
    from bench import quality

    spec = write_world_spec(tmp_path, small_world, steps=4, eval_every=2, warmup_steps=1)
    # overrides apply to a temporary spec beside the original (relative data paths), which is removed after
    res = quality.run(
        spec,
        [0],
        ["unconstrained"],
        oracle=False,
        log=lambda s: None,
        overrides={"optimize.steps": 6, "optimize.eval_every": 3},
    )
    assert res["overrides"] == {"optimize.steps": 6, "optimize.eval_every": 3}
    assert sorted(p.name for p in spec.parent.iterdir() if p.name.startswith(".quality-")) == []
    (row,) = res["rows"]
    assert row["selected_step"] in (3, 6)  # the original spec evaluates at steps 2 and 4
    assert row["method"] == "unconstrained" and row["target_old"] == pytest.approx(res["v1_accuracy"][4])
    assert [f["budget_pt"] for f in res["shift_frontier"]] == [1, 2, 3]
    gains = [f["target_gain"] for f in res["shift_frontier"]]
    assert gains == sorted(gains) and all(
        f["worst_change"] >= -f["budget_pt"] / 100 - 1e-9 for f in res["shift_frontier"]
    )
    assert "Shift frontier" in quality.table(res)


def test_the_sweep_analysis_picks_the_best_offset_that_validation_allows(tmp_path):
    """bench.sweep --analyse: among (checkpoint, offset) pairs whose protected classes all stay within
    max_drop on validation, the best validation target wins; its held-out numbers are reported."""
    from bench.sweep import analyse

    def point(b, dog, per):  # [offset, target change, worst change, per-class changes, flips]
        return [b, dog, min(x for i, x in enumerate(per) if i != 1), per, []]

    trace = [
        {
            "step": 50,
            "val_curve": [point(0.0, 0.30, [-0.05, 0.30, 0.0]), point(-1.0, 0.20, [-0.01, 0.20, 0.0])],
            "held_curve": [[0.0, 0.28, -0.06, []], [-1.0, 0.18, -0.02, []]],
        },
        {
            "step": 100,
            "val_curve": [point(0.0, 0.25, [-0.02, 0.25, 0.0]), point(-1.0, 0.10, [0.0, 0.10, 0.0])],
            "held_curve": [[0.0, 0.24, -0.04, []], [-1.0, 0.09, -0.01, []]],
        },
    ]
    f = tmp_path / "sweep.jsonl"
    f.write_text(json.dumps({"variant": "v", "seed": 0, "target_index": 1, "trace": trace}) + "\n")
    (line,) = analyse(f, max_drop=0.01)
    assert "step 50 b-1.0: +0.180 / -2.00 pt" in line and line.endswith("<- bar")  # +0.18 within 3 points
    (line,) = analyse(f, max_drop=0.0)
    assert "step 100 b-1.0: +0.090 / -1.00 pt" in line and not line.endswith("<- bar")


# ------------------------------------------------------------------------------------------ bench.tune_world
def test_the_tuning_judge_splits_each_class_and_keeps_every_row(tmp_path):
    from bench.tune_world import split_heldout

    m = tmp_path / "heldout.csv"
    rows = [(f"img/{c}{i}.png", c) for c in ("a", "b") for i in range(7)]
    m.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    first, after = split_heldout(m, first=3)
    read = lambda p: [tuple(r.split(",")) for r in p.read_text().splitlines()[1:]]  # noqa: E731
    assert read(first) == [r for c in "ab" for r in [x for x in rows if x[1] == c][:3]]
    assert sorted(read(first) + read(after)) == sorted(rows) and not set(read(first)) & set(read(after))


def test_the_tuning_row_pools_the_run_and_the_judge():
    """Gain is the size-weighted mean over both splits; the worst capability has the most net negative
    flips over both; the exit code is the release decision of the run."""
    from bench.quality import set_dotted
    from bench.tune_world import summarise

    def result(flips, target, verdict="certified", goal=True):
        return {
            "verdict": verdict,
            "capabilities": [
                {"name": k, "negative_flips": b, "positive_flips": c, "status": "certified"}
                for k, (b, c) in flips.items()
            ],
            "target": {"n": target[0], "old_accuracy": target[1], "new_accuracy": target[2], "goal_met": goal},
            "selection": {"step": 150},
        }

    run = result({"cat": (2, 0), "cow": (1, 1)}, (400, 0.5, 0.62))
    judge = result({"cat": (3, 1), "cow": (5, 0)}, (600, 0.5, 0.6), goal=False)
    row = summarise(run, judge)
    assert row["gain"] == pytest.approx((0.12 * 400 + 0.10 * 600) / 1000)
    assert (row["worst"], row["worst_net_flips"], row["negative_flips"], row["positive_flips"]) == ("cow", 5, 11, 2)
    assert row["exit"] == 0 and row["step"] == 150
    assert (
        summarise(result({"cat": (0, 0)}, (400, 0.5, 0.55), goal=False), result({"cat": (0, 0)}, (600, 0.5, 0.5)))[
            "exit"
        ]
        == 1
    )
    spec = {"protect": [{"constraint": {"slack": 0.003}}], "optimize": {}}
    set_dotted(spec, "protect.0.constraint.slack", 0.001)
    set_dotted(spec, "optimize.batch.target", 32)
    assert spec == {"protect": [{"constraint": {"slack": 0.001}}], "optimize": {"batch": {"target": 32}}}


def test_the_tuning_table_merges_a_variants_seeds_run_apart(tmp_path):
    """Seeds run in parallel log one line each: the table shows them side by side, a rerun seed replaces
    its row, and a line with other settings starts the variant over."""
    from bench.tune_world import table

    def line(name, settings, seeds, gain):
        rows = [
            {
                "seed": s,
                "gain": gain,
                "worst": "coat",
                "worst_net_flips": 1,
                "negative_flips": 2,
                "certified_run": 9,
                "exit": 0,
            }
            for s in seeds
        ]
        return json.dumps({"name": name, "settings": settings, "heldout": 400, "rows": rows})

    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            [
                line("a", {"x": 1}, [0], 0.1),
                line("a", {"x": 1}, [2], 0.2),
                line("a", {"x": 1}, [1, 2], 0.3),
                line("b", {"x": 1}, [0], 0.1),
                line("b", {"x": 2}, [1], 0.4),
            ]
        )
    )
    rows = {r.split("|")[1].strip(): r for r in table(log).splitlines()[2:]}
    assert "+0.100 / +0.300 / +0.300 (mean +0.233)" in rows["a"]
    assert "+0.400 (mean +0.400)" in rows["b"] and "`x: 2`" in rows["b"]


def test_spec_with_writes_outside_the_spec_folder_and_keeps_the_paths_working():
    """A variant spec goes to a temporary folder (a stray file in specs/ would be read by every test that
    globs it), with its data paths made absolute; it is gone afterwards."""
    from bench.quality import spec_with
    from safespec.plan import load_plan

    good = Path(__file__).parent / "specs" / "good.yaml"
    before = sorted(p.name for p in good.parent.iterdir())
    with spec_with(good, {"optimize.eval_every": 5}) as path:
        assert path.parent != good.parent and path.is_file()
        _, plan = load_plan(path, check_files=False)
        assert plan.optimizer.eval_every == 5 and Path(plan.data.protected).is_absolute()
        assert sorted(p.name for p in good.parent.iterdir()) == before
    assert not path.exists()


def _trace(tmp_path, seed: int = 0) -> None:
    """A hand-made replay trace: 3 classes (target 2), 100 validation and 1,000 held-out images per class.
    Candidate 1 lifts the target's logit by 3 (its images become right, and a tenth of class 0's images
    flip to the target); candidate 2 lifts it by 1 (half the target's images, nobody else's). A target
    offset can make either one right on every target image without a flip."""
    from bench import selection_replay as sr

    rng = np.random.default_rng(seed)

    def logits(n_per_class: int, lift: float) -> np.ndarray:
        y = np.repeat(np.arange(3), n_per_class)
        z = np.zeros((len(y), 3), dtype=np.float32)
        z[np.arange(len(y)), y] = 2.0
        z[y != 2, 2] = -5.0  # far from the target, except:
        t = y == 2
        z[t, 2] = np.where(np.arange(t.sum()) % 2 == 0, -1.5, -0.5)  # the old model gets no target image right
        c0 = np.flatnonzero(y == 0)
        z[c0[: n_per_class // 10], 2] = -0.5  # a tenth of class 0 sits 2.5 below its own logit
        z[:, 2] += lift
        z += rng.normal(0, 1e-3, z.shape).astype(np.float32)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    np.savez(
        tmp_path / f"s{seed}.npz",
        steps=np.array([0, 50, 100]),
        val=np.stack([logits(100, x) for x in (0.0, 3.0, 1.0)]),
        held=np.stack([logits(1000, x) for x in (0.0, 3.0, 1.0)]),
        val_labels=np.repeat(np.arange(3), 100),
        held_labels=np.repeat(np.arange(3), 1000),
        target=2,
        tau=0.05,
    )
    sr.OUT = tmp_path


def test_the_selection_replay_picks_what_safespec_would_and_judges_it(tmp_path, monkeypatch):
    from bench import selection_replay as sr
    from safespec.certify.selection import Capability, Selector

    monkeypatch.setattr(sr, "OUT", tmp_path)
    _trace(tmp_path)
    d = dict(np.load(tmp_path / "s0.npz"))
    caps = [Capability(str(c), (c,), 0.03, 0.95, 400) for c in (0, 1)]
    sel = Selector(d["val"][0], d["val_labels"], caps, 2, 0.8)
    # without an offset, candidate 1 flips a tenth of class 0: refused; candidate 2 gains half the target
    k, offset = sr.choose(sel, d["val"], "target")
    assert k in (1, 2)
    out = sr.judge(d, k, offset, sr._per_class_rows(d["held_labels"], slice(0, 400)))
    assert out["certified"] == out["caps"] == 2 and out["violated_true"] == 0
    assert out["gain"] >= 0.45 and out["goal"] and out["exit0"]
    # the old model is judged unchanged: certified, no gain, goal missed
    old = sr.judge(d, 0, 0.0, sr._per_class_rows(d["held_labels"], slice(0, 400)))
    assert old["certified"] == 2 and old["gain"] == 0 and not old["goal"]
    # candidate 1 as it is (no offset) loses a tenth of class 0: not certified, and truly over tolerance
    bad = sr.judge(d, 1, 0.0, sr._per_class_rows(d["held_labels"], slice(0, 400)))
    assert bad["certified"] == 1 and bad["worst_true"] >= 0.09 and not bad["exit0"]
    table = sr.table([0], [100], [400], [0.8])
    assert "| 100 | 400 | target | 0.8 | 2/2 | 2/2 | 2/2 |" in table  # two disjoint chunks of 400
    # the last candidate with its best offset (above 0.5) gets every target image right and flips nobody
    front = sr.frontier([""], [0], levels=(0, 200))
    assert "| the demo spec | +1.000; +1.000 | +1.000; +1.000 |" in front
    # v1 alone reaches only its target images within 1.5 of the boundary (the offset grid stops there); the
    # mean of the last two candidates lifts the target by 2 and gets every one right; the gate never fires
    # here (v1's top two tie on every target image), so it reads as the last candidate does
    front = sr.frontier([""], [0], levels=(0, 200), readouts=("v1", "mean2", "gate"))
    assert "| the demo spec, v1 | +0.500; +0.500 | +0.500; +0.500 |" in front
    assert "| the demo spec, mean2 | +1.000; +1.000 | +1.000; +1.000 |" in front
    assert "| the demo spec, gate | +1.000; +1.000 | +1.000; +1.000 |" in front


def test_the_probe_frontier_counts_net_flips_and_a_probe_learns_a_feature_that_flags_the_target():
    from bench import probe_frontier as pf

    # three classes, target 2: v1 misses both targets by 0.1; one class-0 image sits 0.05 from flipping
    cos = np.array([[0.6, 0.0, 0.5], [0.6, 0.0, 0.5], [0.6, 0.0, 0.55], [0.6, 0.0, 0.3], [0.0, 0.6, 0.3]], np.float32)
    y = np.array([2, 2, 0, 0, 1])
    front = pf.frontier(cos, cos, y, 2, levels=(0, 1))
    assert front[0] == 0.0 and front[1] == 1.0  # the offset that rescues both targets flips the near image
    # a feature that is 1 on exactly the targets: the probe learns to raise the target there and nowhere else
    feat = (y == 2).astype(np.float32)[:, None]
    same = pf.train_probe((cos, feat, y, np.ones(5, np.float32)), 2, steps=0)(cos, feat)
    np.testing.assert_array_equal(same, cos)  # zero-initialised: before training the probe is v1
    learned = pf.train_probe((cos, feat, y, np.ones(5, np.float32)), 2, steps=200)(cos, feat)
    assert pf.frontier(learned, cos, y, 2, levels=(0,))[0] == 1.0


def test_an_offset_per_rival_class_rescues_the_targets_one_offset_cannot(tmp_path, monkeypatch):
    from bench import selection_replay as sr
    from safespec.certify.selection import Capability, Selector, rival_offsets

    z, y = rival_logits(1000, 100)
    moved = rival_offsets(z, 2, np.array([0.6, 0.0, 0.0]))
    np.testing.assert_array_equal(moved[:, :2], z[:, :2])  # the other classes never move
    wins = moved.argmax(1) == 2
    assert wins[y == 2].mean() == 0.5 and not wins[y != 2].any()  # against class 0 only
    # the replay's halves: one offset (any budget up to a tenth of class 1) gains nothing; one per rival half
    monkeypatch.setattr(sr, "OUT", tmp_path)
    np.savez(
        tmp_path / "s0.npz",
        steps=np.array([0, 50]),
        val=np.stack([z, z]),
        held=np.stack([z, z]),
        val_labels=y,
        held_labels=y,
        target=2,
        tau=0.05,
    )
    table = sr.split_frontier([""], [0], budgets=(0, 10))
    assert "| the demo spec | one | +0.000, 0.0 | +0.000, 0.0 |" in table
    assert "| the demo spec | one per rival | +0.500, 0.0 | +0.500, 0.0 |" in table
    # the replay's per-rival rule is safespec's: class 0's offset past the targets' gap, class 1's below 0.3
    zv, yv = rival_logits(100, 10)
    caps = [Capability(str(c), (c,), 0.03, 0.95, 400) for c in (0, 1)]
    sel = Selector(zv, yv, caps, 2, 0.8)
    k, off = sr.choose(sel, np.stack([zv, zv]), "per-rival")
    assert off[0] > 0.5 and off[1] < 0.3
    assert k == 1 and np.ndim(off) == 1
    out = sr.judge({"held": np.stack([z, z]), "held_labels": y, "target": 2}, k, off, np.arange(len(y)))
    assert out["gain"] == 0.5 and out["certified"] == out["caps"] == 2
