"""`make bench`: run the benchmarks on this machine and write bench/RESULTS.md.

Sections: the constrained step against a bare forward+backward, `safespec verify` against a bare
inference loop, the step against the number of protected classes (bench/overhead.py), the demo's wall
time and memory (bench/demo.py), the task-dependent heads' routed projection against the plain one
(bench/heads.py) and the quality of every method on the demo world (bench/quality.py). The timings of a
section are measured in one run, as ratios.

Each section's numbers are kept in bench/results/<section>.json and RESULTS.md is rendered from every
JSON file present, so that `python -m bench --only verify` re-measures one section and leaves the others
as they were; a section written by hand in RESULTS.md (any heading not generated here) is kept too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
SPEC = ROOT / "specs" / "demo.yaml"

SECTIONS = ("steps", "verify", "scaling", "frozen", "demo", "heads", "quality", "quality-second", "size")
HEADINGS = {
    "steps": "Step overhead: constrained training step / bare forward+backward",
    "verify": "Certification throughput: `safespec verify` / bare inference loop",
    "scaling": "Scaling in the number of protected classes",
    "frozen": "Frozen towers: cached features against encoding every step",
    "demo": "The demo: `safespec run specs/demo.yaml`, world cached",
    "heads": "Task-dependent heads: routed projection / plain projection",
    "quality": "Quality on the demo world (held-out, 400 images per class)",
    "quality-second": "Quality on the second world, with the demo's settings (held-out, 400 images per class)",
    "size": "The certificate's size: exact test against Tango's score test",
}
GOALS_HEADING = "Goals"
NEEDS_WORLD = {"steps", "verify", "frozen", "demo", "quality"}
#: Which world each quality section's settings were chosen on, and which it judges them on.
TUNED_ON = "the demo world (Animal-MNIST), on its validation split only (bench/tuning.py)"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}"


# ------------------------------------------------------------------------------------------ measuring
def measure(section: str, *, quick: bool, log) -> dict:
    from . import demo, heads, overhead, quality

    if section in overhead.SECTIONS:
        return overhead.run([section], quick=quick, spec_path=SPEC, log=log)[section]
    if section == "demo":
        return demo.run(SPEC, quick=quick, log=log)
    if section == "heads":
        return heads.run()
    seeds = [0] if quick else [0, 1, 2]
    if section == "quality":
        return quality.run(SPEC, seeds, quality.ROWS, oracle=not quick, log=log)
    if section == "quality-second":
        from . import worlds

        world = worlds.build("second", quiet=True)
        return quality.run(worlds.spec_for(world), seeds, quality.ROWS, oracle=False, log=log)
    if section == "size":
        from . import size

        return size.run(quick=quick)
    raise KeyError(section)


# ------------------------------------------------------------------------------------------ rendering
def _heads_goals(r: dict) -> list:
    rows = []
    for key, res in r.items():
        if key.startswith("threads_"):
            worst = max(
                res[s][f"{k}_ratio_routed_over_plain"]
                for s in ("paper_text_batch", "paper_text_batch_shuffled")
                if s in res
                for k in ("forward", "forward_backward")
            )
            rows.append(
                (
                    f"heads: routed / plain projection, paper text batch, {key[len('threads_') :]} thread(s), worst",
                    worst,
                    "<= 2",
                    bool(res["goal_routed_at_most_2x_plain"]),
                )
            )
    return rows


def _heads_markdown(r: dict) -> str:
    lines = ["| threads | scenario | forward ratio | forward+backward ratio |", "|---|---|---|---|"]
    for key, res in r.items():
        if key.startswith("threads_"):
            for s, v in res.items():
                if isinstance(v, dict):
                    lines.append(
                        f"| {key[len('threads_') :]} | {s} ({v['distinct_heads']} heads) "
                        f"| {v['forward_ratio_routed_over_plain']} | {v['forward_backward_ratio_routed_over_plain']} |"
                    )
    return "\n".join(lines + ["", "```json", json.dumps(r, indent=2), "```"])


def _quality_markdown(q: dict) -> str:
    from . import quality

    t = q["classes"].index(q["target"])
    spec = f"`specs/{Path(q['spec']).name}`"
    if spec != "`specs/demo.yaml`":
        spec = "`specs/demo.yaml` with this world's class names and paths (`bench/worlds.py`, `spec_for`)"
    over = ", ".join(f"`{k}: {v}`" for k, v in (q.get("overrides") or {}).items())
    return (
        f"Settings chosen on {TUNED_ON}. "
        f"Spec: {spec}" + (f" with {over}" if over else "") + f"; the method changes per row, the rest is "
        f"the spec's. v1 (the old model): {q['target']} {q['v1_accuracy'][t]:.3f}; Δ = new − v1 held-out accuracy "
        f"of each of the {len(q['classes']) - 1} protected classes; the offset is the calibrated target offset "
        f"(cosine units) where the spec asks for one; certified counts and exit codes are recomputed from "
        f"each capability's paired table by the current certificate ({_test_name(q)}).\n\n"
        + quality.frontier(q)
        + "\n\n"
        + quality.table(q)
    )


def _test_name(q: dict) -> str:
    from safespec.certify import STATISTICS

    return STATISTICS.get("test", "exact") + " test"


def _size_goals(r: dict) -> list:
    return [
        (
            "exact test: largest false-certification rate on the grid",
            r["exact_max_size"],
            f"<= {r['alpha']}",
            r["exact_max_size"] <= r["alpha"] + 1e-12,
        )
    ]


def _size_markdown(r: dict) -> str:
    from . import size

    return size.markdown(r)


def _renderers(section: str) -> tuple:
    """(goals, markdown) of a section: bench/overhead.py's sections render themselves; demo, heads and
    quality here (quality has no goal row: it is judged from its table)."""
    from . import demo, overhead

    if section in overhead.SECTIONS:
        return (lambda r: overhead.goals(section, r)), (lambda r: overhead.markdown(section, r))
    return {
        "demo": (demo.goals, demo.markdown),
        "heads": (_heads_goals, _heads_markdown),
        "quality": ((lambda r: []), _quality_markdown),
        "quality-second": ((lambda r: []), _quality_markdown),
        "size": (_size_goals, _size_markdown),
    }[section]


def goals(section: str, r: dict) -> list:
    return _renderers(section)[0](r)


def markdown(section: str, r: dict) -> str:
    return _renderers(section)[1](r)


def _split_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every `## ` section of a RESULTS.md, in order; the preamble is dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((line[3:].strip(), []))
        elif out:
            out[-1][1].append(line)
    return [(h, "\n".join(body).strip()) for h, body in out]


def _fmt(v) -> str:
    return ("yes" if v else "no") if isinstance(v, bool) else str(v)


def render(results: Path, old_text: str = "") -> str:
    old = _split_sections(old_text)
    old_bodies = dict(old)
    loaded = {s: json.loads((results / f"{s}.json").read_text()) for s in SECTIONS if (results / f"{s}.json").exists()}
    out = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`; `python -m bench --only SECTION...` re-measures some sections "
        "and keeps the others). Each section names the machine and the day it was measured; its timings were "
        "taken in one run, interleaved, and are given as ratios.",
        "",
        f"## {GOALS_HEADING}",
        "",
        "| measure | value | goal | met | section |",
        "|---|---|---|---|---|",
    ]
    for s, r in loaded.items():
        quick = " (quick run)" if r.get("measured", {}).get("quick") else ""
        out += [f"| {name}{quick} | {_fmt(v)} | {goal} | {_fmt(met)} | {s} |" for name, v, goal, met in goals(s, r)]
    out.append("")
    for s in SECTIONS:
        heading = HEADINGS[s]
        if s in loaded:
            r = loaded[s]
            m = r.get("measured")
            note = (
                (
                    f"Measured {m['date']} on {m['machine']}"
                    + (
                        " with `--quick`: short timings, a smoke run of the harness, not a measurement."
                        if m["quick"]
                        else "."
                    )
                    + "\n\n"
                )
                if m
                else ""
            )
            out += [f"## {heading}", "", note + markdown(s, r), ""]
        elif heading in old_bodies:
            out += [f"## {heading}", "", old_bodies[heading], ""]
    generated = set(HEADINGS.values()) | {GOALS_HEADING}
    for heading, body in old:
        if heading not in generated:
            out += [f"## {heading}", "", body, ""]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="safespec benchmarks")
    ap.add_argument(
        "--quick", action="store_true", help="short timings, one seed, no oracle (a smoke run of the harness)"
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"measure only these sections ({', '.join(SECTIONS)}); the others keep their last results",
    )
    a = ap.parse_args(argv)
    sections = a.only or list(SECTIONS)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if NEEDS_WORLD & set(sections):
        from safespec.demo import build_world
        from safespec.spec import load_spec

        build_world(load_spec(SPEC, check_files=False).data.protected.parent, progress=False, log=log)
    RESULTS.mkdir(exist_ok=True)
    for s in SECTIONS:
        if s not in sections:
            continue
        log(f"== {s}")
        started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        r = measure(s, quick=a.quick, log=log)
        r["measured"] = {"date": started, "machine": machine(), "quick": a.quick}
        (RESULTS / f"{s}.json").write_text(json.dumps(r, indent=2))
        # rendered after every section, so that results measured before a failure are not lost
        RESULTS_MD.write_text(render(RESULTS, RESULTS_MD.read_text() if RESULTS_MD.exists() else ""))
    print(RESULTS_MD.read_text())


if __name__ == "__main__":
    main()
