"""The refactor's guard (issue 13): short runs of every method give the numbers recorded before it.

``tests/golden/small-world.json`` holds each case's fingerprint (bench/golden.py: selected step and offset,
the selected model's weight digest, every capability's paired counts) from the code as it was before the
restructure, per float platform (``bench.golden.float_platform``: the torch build and the CPU's kernels;
another CPU rounds differently, so its fingerprints are its own). A change of any computation on the path
moves one of them. Re-record only for a change that is meant to change numbers, and say so in its commit;
a new platform's entry is recorded from a commit whose numbers are known good:

    .venv/bin/python tests/test_golden.py    # rebuilds the small world in a temporary folder, rewrites this platform's entry
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "small-world.json"
STEPS = 20

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.golden import differences, float_platform, record  # noqa: E402
from world_spec import write_world_spec  # noqa: E402


def _record(world, folder: Path) -> dict:
    spec = write_world_spec(folder, world, steps=STEPS)
    return record(spec, steps=STEPS, log=lambda s: None)


def test_every_method_gives_the_recorded_numbers(small_world, tmp_path):
    import pytest

    platforms = json.loads(GOLDEN.read_text())["platforms"]
    here = float_platform()
    if here not in platforms:
        pytest.skip(f"no golden fingerprints for {here} (recorded: {'; '.join(platforms)}); record them there")
    want = platforms[here]
    got = _record(small_world, tmp_path)
    assert set(got["cases"]) == set(want["cases"])
    assert differences(want, got) == []
    # the cases are not all the same run: the fingerprint sees each method's training, also where selection
    # kept the old model
    assert len({json.dumps(c["trajectory"]) for c in got["cases"].values()}) == len(got["cases"])
    assert len({c["model_digest"] for c in got["cases"].values()}) >= 3


if __name__ == "__main__":
    import tempfile

    from conftest import SMALL_WORLD
    from safespec.demo import build_world

    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", SMALL_WORLD, progress=False, log=lambda *_: None)
        platforms = json.loads(GOLDEN.read_text())["platforms"] if GOLDEN.exists() else {}
        platforms[float_platform()] = _record(world, Path(tmp))
        GOLDEN.write_text(json.dumps({"platforms": platforms}, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({float_platform()})")
