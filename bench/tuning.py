"""A tuning view of a world that never touches its held-out split.

Settings (the demo spec, the defaults, the selection rule) are chosen while looking at outcomes, and no
outcome may come from a held-out split: that is what the certificate is for. This view splits a world's
validation split, per class and by a fixed seed, into a selection half (the spec's ``validation``) and a
judging half (the spec's ``heldout``); the protected store and the target set are the world's own. A
setting chosen on this view has seen neither the world's held-out images nor the other world at all.

    python -m bench.tuning SPEC [--out DIR]    # writes DIR/spec.yaml (default: out/tuning-<name>/)
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def split_rows(rows: list[tuple[str, str]], seed: int = 0) -> tuple[list, list]:
    """Half of each class's rows (rounded down) for selection, the rest for judging; a fixed permutation."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for r in rows:
        by_class.setdefault(r[1], []).append(r)
    select, judge = [], []
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        half = len(group) // 2
        select += [group[i] for i in sorted(order[:half])]
        judge += [group[i] for i in sorted(order[half:])]
    return select, judge


def make_view(spec_path: Path, out: Path, seed: int = 0) -> Path:
    """Write the view's two manifests and a copy of ``spec_path`` that uses them; return the new spec."""
    spec_path = Path(spec_path).resolve()
    spec = yaml.safe_load(spec_path.read_text())
    base = spec_path.parent
    val = (base / spec["data"]["validation"]).resolve()
    with val.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [tuple(r) for r in reader]
    select, judge = split_rows([(r[0], r[1]) for r in rows], seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("select", select), ("judge", judge)):
        with (out / f"{name}.csv").open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header[:2])
            # manifest paths are relative to the manifest: make them absolute
            w.writerows([(str((val.parent / p).resolve()), label) for p, label in part])
    data = spec["data"]
    for k in ("protected", "target"):
        data[k] = str((base / data[k]).resolve())
    data["validation"], data["heldout"] = str(out / "select.csv"), str(out / "judge.csv")
    if spec.get("model", {}).get("checkpoint"):
        spec["model"]["checkpoint"] = str((base / spec["model"]["checkpoint"]).resolve())
    spec["name"] = f"{spec['name']}-tuning"
    spec.setdefault("report", {})["dir"] = str(out / "run")
    target = out / "spec.yaml"
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    name = yaml.safe_load(a.spec.read_text())["name"]
    print(make_view(a.spec, a.out or ROOT / "out" / f"tuning-{name}", a.seed))


if __name__ == "__main__":
    main()
