"""Development cycles as a lineage: the registry, carried capabilities, drift budgets and `safespec lineage`.

The registry's own behaviour (atomic writes, the lock, verification, damaged indexes) is tested on releases
written directly; the cycle's behaviour (registration, `model.from: lineage`, carried capabilities, budgets
against every ancestor) on a chain of real runs on the small world."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from safespec.certify import certify_budgets
from safespec.cli import main
from safespec.data import read_manifest
from safespec.lineage import CertifiedCapability, LineageError, Registry
from safespec.model import tensor_digest
from safespec.plan import compile_spec
from safespec.spec import parse_spec
from world_spec import write_world_spec


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ releases written directly
def _model(folder: Path, seed: int) -> tuple[Path, str]:
    t = {"w": torch.arange(4, dtype=torch.float32) + seed}
    path = folder / f"m{seed}.safetensors"
    save_file(t, str(path))
    return path, tensor_digest(t)


def _result(old: str | None, new: str, *, verdict="certified", goal=True) -> dict:
    """The smallest result.json a release can hold."""
    cap = {
        "name": "cat",
        "classes": ["cat"],
        "status": "certified" if verdict == "certified" else "violated",
        "tolerance": 0.03,
        "confidence": 0.95,
        "n": 100,
        "old_accuracy": 0.9,
        "new_accuracy": 0.9,
        "drop_upper_bound": 0.01,
        "negative_flips": 0,
        "positive_flips": 0,
        "needed_n": None,
    }
    return {
        "schema_version": 1,
        "verdict": verdict,
        "method": "lagrangian",
        "capabilities": [cap],
        "target": {"class": "dog", "n": 100, "old_accuracy": 0.3, "new_accuracy": 0.5, "goal_met": goal},
        "provenance": {"old_model": {"digest": old}, "new_model": {"digest": new}},
    }


def _add(reg: Registry, tmp: Path, seed: int, *, parent: str | None, result: dict | None = None):
    path, digest = _model(tmp, seed)
    run = tmp / f"run{seed}"
    run.mkdir(exist_ok=True)
    (run / "result.json").write_text(json.dumps(result or _result(parent, digest)))
    (run / "report.html").write_text("<html></html>")
    (run / "junit.xml").write_text("<testsuites/>")
    return reg.add(
        model_file=path,
        digest=digest,
        parent=parent,
        name=f"cycle{seed}",
        target="dog",
        classes=("cat", "dog"),
        certified=[CertifiedCapability("cat", ("cat",))],
        accuracy={"cat": 0.9, "dog": 0.5},
        created="2026-12-02T00:00:00+00:00",
        run_files={f: run / f for f in ("result.json", "report.html", "junit.xml")} if seed else None,
        spec_text="safespec: 1\n" if seed else None,
    )


@pytest.fixture
def chain(tmp_path) -> Registry:
    """Origin and two releases, written through the registry's own API."""
    reg = Registry(tmp_path / "registry")
    with reg.locked():
        origin = _add(reg, tmp_path, 0, parent=None)
        r1 = _add(reg, tmp_path, 1, parent=origin.digest)
        _add(reg, tmp_path, 2, parent=r1.digest)
    return reg


def test_a_registry_lists_shows_and_verifies_its_releases(chain):
    reg = Registry.open(chain.path)
    assert [r.id for r in reg.releases] == [0, 1, 2]
    assert [r.parent for r in reg.releases] == [None, reg.releases[0].digest, reg.releases[1].digest]
    assert (chain.path / reg.releases[2].model_file).is_file()
    assert sorted(p.name for p in (chain.path / "releases" / "0002").iterdir()) == [
        "junit.xml",
        "release.json",
        "report.html",
        "result.json",
        "spec.yaml",
    ]
    listed = _cli("lineage", "list", chain.path)
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()] == ["release", "0", "1", "2"]
    shown = _cli("lineage", "show", chain.path, "1")
    assert shown.exit_code == 0 and reg.releases[1].digest in shown.output and "cycle1" in shown.output
    assert reg.release(reg.releases[2].digest.split(":")[1][:10]).id == 2
    ok = _cli("lineage", "verify", chain.path)
    assert ok.exit_code == 0, ok.output
    assert "ok (3 release(s)" in ok.output


@pytest.mark.parametrize(
    "damage, finding",
    [
        (lambda p, r: (p / "releases/0001/report.html").write_text("<html>edited</html>"), "report.html: changed"),
        (lambda p, r: (p / "releases/0002/result.json").unlink(), "result.json: missing"),
        (lambda p, r: (p / r[1].model_file).write_bytes(b"not a model"), "changed since it was registered"),
        (lambda p, r: (p / "releases/0002/spec.yaml").write_text("safespec: 2\n"), "spec.yaml: changed"),
    ],
    ids=["report", "missing-result", "model", "spec"],
)
def test_lineage_verify_detects_a_tampered_or_missing_file(chain, damage, finding):
    damage(chain.path, Registry.open(chain.path).releases)
    res = _cli("lineage", "verify", chain.path)
    assert res.exit_code == 1, res.output
    assert finding in res.output


def test_lineage_verify_rechecks_the_chain_and_the_stored_certificates(chain, tmp_path):
    """An index edited consistently with a file (so every hash matches) is still caught: a parent that is
    not the previous release, a stored result that is not a certified release of that model."""
    index = chain.path / "index.json"
    data = json.loads(index.read_text())
    data["releases"][2]["parent"] = data["releases"][0]["digest"]
    index.write_text(json.dumps(data))
    res = _cli("lineage", "verify", chain.path)
    assert res.exit_code == 1 and "is not the previous release's digest" in res.output, res.output

    reg = Registry(tmp_path / "other")
    with reg.locked():
        origin = _add(reg, tmp_path, 0, parent=None)
        _, digest = _model(tmp_path, 5)
        _add(reg, tmp_path, 5, parent=origin.digest, result=_result(origin.digest, digest, verdict="not_certified"))
    res = _cli("lineage", "verify", reg.path)
    assert res.exit_code == 1 and "not a release (verdict not_certified" in res.output, res.output


@pytest.mark.parametrize(
    "text, where",
    [
        ("{not json", "index.json:1:2: not valid JSON"),
        ('{"format": 7, "releases": []}', "format: expected 1, got 7"),
        ('{"format": 1, "releases": [{"id": 0}]}', "releases[0].digest: expected str"),
        ('{"format": 1, "releases": {}}', "releases: expected an array"),
    ],
)
def test_a_damaged_index_is_one_located_line_with_exit_2(tmp_path, text, where):
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "index.json").write_text(text)
    res = _cli("lineage", "list", reg)
    assert res.exit_code == 2 and where in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_bad_registry_paths_are_one_line_with_exit_2(tmp_path):
    res = _cli("lineage", "list", tmp_path / "nowhere")
    assert res.exit_code == 2 and "no such lineage registry" in res.output
    f = tmp_path / "file"
    f.write_text("x")
    res = _cli("lineage", "verify", f)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def _register_after(path: str, parent: str | None, seed: int, delay: float, out) -> None:
    """A process that takes the lock, waits (so that the other writer queues behind it) and registers."""
    tmp = Path(path).parent
    reg = Registry(Path(path))
    try:
        with reg.locked(timeout=30):
            time.sleep(delay)
            _add(reg, tmp, seed, parent=parent)
        out.put((seed, "ok"))
    except LineageError as e:
        out.put((seed, str(e)))


def test_two_concurrent_registrations_leave_a_valid_registry(tmp_path):
    """Both start from the same latest release: the first registers, the second waits for the lock, sees
    that the lineage moved on and refuses with one line; the index holds exactly one new release."""
    reg = Registry(tmp_path / "registry")
    with reg.locked():
        origin = _add(reg, tmp_path, 0, parent=None)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_register_after, args=(str(reg.path), origin.digest, seed, 0.5, out)) for seed in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    answers = dict(out.get(timeout=5) for _ in procs)
    assert sorted(v == "ok" for v in answers.values()) == [False, True], answers
    assert any("moved on" in v for v in answers.values())
    final = Registry.open(reg.path)
    assert [r.id for r in final.releases] == [0, 1]
    assert _cli("lineage", "verify", reg.path).exit_code == 0


# ------------------------------------------------------------------------------ the spec's lineage fields
_SPEC = """\
safespec: 1
name: cycle
model: {arch: safespec-tiny-vit, checkpoint: v1.safetensors}
classes: {names: [cat, dog, cow]}
data: {protected: p.csv, target: t.csv, validation: v.csv, heldout: h.csv}
protect:
  - classes: [cow]
    tolerance: 0.03
target: {class: dog}
optimize: {batch: {protected_classes: 1}}
"""


@pytest.mark.parametrize(
    "edit, line, message",
    [
        ({"model": {"arch": "safespec-tiny-vit", "from": "lineage"}}, 3, "model.from: 'from: lineage' needs"),
        (
            {"model": {"arch": "safespec-tiny-vit", "checkpoint": "v1.safetensors", "from": "lineage"}},
            3,
            "model.from: give one source",
        ),
        ({"model": {"arch": "safespec-tiny-vit", "from": "latest"}}, 3, "model.from"),
        (
            {"protect": [{"classes": ["cow"], "tolerance": 0.03, "budget": 0.05}]},
            6,
            "protect[0].budget: a drift budget",
        ),
        (
            {"lineage": {"dir": "reg"}, "protect": [{"classes": ["cow"], "tolerance": 0.03, "budget": 1.5}]},
            6,
            "protect[0].budget",
        ),
        ({"lineage": {"dir": "reg", "carry_tolerance": -0.1}}, 10, "lineage.carry_tolerance"),
        ({"lineage": {"dir": "reg", "register": "yes"}}, 10, "lineage.register"),
        ({"lineage": {"dir": ""}}, 10, "lineage.dir"),
        ({"lineage": {"dri": "reg"}}, 10, "lineage.dri"),
    ],
    ids=lambda v: None,
)
def test_bad_lineage_fields_are_located_one_line_errors(tmp_path, edit, line, message):
    spec = yaml.safe_load(_SPEC)
    spec.update(edit)
    path = tmp_path / "spec.yaml"
    text = yaml.safe_dump(
        {k: spec[k] for k in ["safespec", "name", "model", "classes", "data", "protect", "target", "optimize"]}
    )
    if "lineage" in spec:
        text += yaml.safe_dump({"lineage": spec["lineage"]})
    path.write_text(text)
    res = _cli("validate", "--no-data-check", path)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"{path}:"), lines


def test_a_lineage_without_releases_and_a_damaged_one_are_located_at_lineage_dir(tmp_path):
    spec = yaml.safe_load(_SPEC)
    spec["model"] = {"arch": "safespec-tiny-vit", "from": "lineage"}
    spec["lineage"] = {"dir": "reg"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    for f in ("p.csv", "t.csv", "v.csv", "h.csv"):
        (tmp_path / f).write_text("path,label\n")
    # a lint without the data does not read the registry (it is data too)
    assert _cli("validate", "--no-data-check", path).exit_code == 0
    res = _cli("validate", path)
    assert res.exit_code == 2 and "model.from: the lineage at" in res.output and "has no release yet" in res.output
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "index.json").write_text("[]")
    res = _cli("validate", path)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "lineage.dir:" in lines[0], lines
    (tmp_path / "reg" / "index.json").unlink()
    (tmp_path / "reg").rmdir()
    (tmp_path / "reg").write_text("a file")
    res = _cli("validate", path)
    assert res.exit_code == 2 and "is a file, expected the lineage registry's folder" in res.output


def test_releases_carry_what_they_improved_and_certified_into_the_plan(chain, tmp_path):
    """Every class a release improved or was certified for is protected again, at lineage.carry_tolerance,
    unless the spec protects it itself or it is this cycle's target; a spec must keep the lineage's classes."""
    text = _SPEC + f"lineage: {{dir: {chain.path}, carry_tolerance: 0.05, carry_budget: 0.08}}\n"
    releases = tuple(Registry.open(chain.path).releases)  # each improved dog (the latest counts) and certified cat
    spec = parse_spec(text.replace("target: {class: dog}", "target: {class: cow}").replace("[cow]", "[cat]"))
    plan = compile_spec(spec, releases)
    carried = [c for c in plan.constraints if c.carried_from]
    assert [(c.name, c.tolerance, c.budget, c.carried_from) for c in carried] == [("dog", 0.05, 0.08, "release 2")]
    assert [a.label for a in plan.lineage.ancestors] == ["origin", "release 1", "release 2"]
    # the target itself is not carried, and a class the spec protects is not protected twice
    plan = compile_spec(parse_spec(text), releases)
    assert [c.name for c in plan.constraints] == ["cow", "cat"]
    with pytest.raises(ValueError, match="a lineage keeps its classes"):
        compile_spec(parse_spec(text.replace("[cat, dog, cow]", "[dog, cow]")), releases)


# ------------------------------------------------------------------------------ budgets
def test_a_budget_catches_drift_that_each_cycle_alone_keeps_within_tolerance():
    """Each cycle loses 12 of 1,000 cat images (1.2 points: certified against its parent at a 3-point
    tolerance). Against the origin the loss adds up: after one cycle the 3-point budget is certified, after
    two (2.4 points) it is no longer certified, after three (3.6 points) it is violated, while the last
    cycle alone still looks fine."""
    spec = parse_spec(
        _SPEC.replace("classes: [cow]", "classes: [cat]").replace(
            "tolerance: 0.03", "tolerance: 0.03\n    budget: 0.03"
        )
        + "lineage: {dir: reg}\n"
    )
    plan = compile_spec(spec)
    labels = np.zeros(1000, dtype=np.int64)  # every image a cat
    models = []
    for k in range(4):  # model k gets 12 k of them wrong (as dog)
        m = labels.copy()
        m[: 12 * k] = 1
        models.append(m)
    names = ["origin", "release 1", "release 2"]

    def budget(k):
        (cert,) = certify_budgets(plan, labels, list(zip(names[:k], models[:k])), models[k])
        return cert

    assert (budget(1).status, budget(1).against, budget(1).name) == ("certified", "origin", "cat (budget)")
    assert (budget(2).status, budget(2).against) == ("preserved", "origin")
    assert (budget(3).status, budget(3).against) == ("violated", "origin")
    assert certify_budgets(plan, labels, [("release 2", models[2])], models[3])[0].status == "certified"


# ------------------------------------------------------------------------------ a chain of real cycles
#: The small world's target set holds only a few cats: a cat cycle needs more steps than a dog one to gain
#: the goal's 5 points with a margin that holds on other CPUs' float kernels (60 steps gained 2.5 points on
#: one machine and enough on another)
CAT_STEPS = 150


@pytest.fixture(scope="module")
def lineage_runs(small_world, tmp_path_factory):
    """On the small world: cycle 1 improves dog from v1 (release 1, with the origin), cycle 2 continues from
    the lineage and improves cat (release 2); both certified at the wide tolerance small sets need."""
    root = tmp_path_factory.mktemp("lineage")
    registry = root / "registry"
    runs = {}
    runs["c1"] = _cycle(root, small_world, "c1", "dog", registry, first=True)
    runs["c2"] = _cycle(root, small_world, "c2", "cat", registry, steps=CAT_STEPS)
    return root, registry, runs


def _cycle(root, world, name, target, registry, *, first=False, protect=None, lineage=None, budget=0.6, steps=60):
    folder = root / name
    folder.mkdir()
    spec = write_world_spec(folder, world, method="unconstrained", steps=steps, tolerance=0.6)
    d = yaml.safe_load(spec.read_text())
    d["name"] = name
    d["target"]["class"] = target
    d["certify"] = {"require": "preserved"}
    d["lineage"] = {"dir": str(registry), **(lineage or {})}
    if protect is not None:
        d["protect"] = protect
    d["protect"][0]["budget"] = budget
    if not first:  # later cycles continue the lineage, and their store holds dog (improved by cycle 1) too
        del d["model"]["checkpoint"]
        d["model"]["from"] = "lineage"
        rows = list(csv.reader(open(world.manifests["protected"])))
        rows += [r[:2] for r in list(csv.reader(open(world.manifests["target"])))[1:] if r[1] == "dog"]
        store = Path(world.manifests["protected"]).parent / f"protected-{root.name}-{name}.csv"
        with store.open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        d["data"]["protected"] = str(store)
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    res = _cli("run", spec, "--quiet")
    result = (
        json.loads((folder / "run" / "result.json").read_text()) if (folder / "run" / "result.json").exists() else None
    )
    return {"spec": spec, "exit": res.exit_code, "output": res.output, "result": result}


def test_certified_cycles_are_registered_in_a_chain(lineage_runs):
    root, registry, runs = lineage_runs
    assert runs["c1"]["exit"] == 0 and runs["c2"]["exit"] == 0, (runs["c1"]["output"], runs["c2"]["output"])
    reg = Registry.open(registry)
    assert [(r.id, r.name, r.target) for r in reg.releases] == [(0, "origin", None), (1, "c1", "dog"), (2, "c2", "cat")]
    r1, r2 = runs["c1"]["result"], runs["c2"]["result"]
    n_budgets = sum(1 for c in r2["capabilities"] if "against" in c)
    assert n_budgets == 9 and f"9 of 9 protected capabilities and 9 of {n_budgets} budgets" in runs["c2"]["output"]
    assert r1["lineage"]["release"] == {"id": 1, "digest": reg.releases[1].digest}
    assert r1["provenance"]["old_model"]["digest"] == reg.releases[0].digest
    # cycle 2 started from release 1 (model.from: lineage) and was certified against the origin too
    assert r2["provenance"]["old_model"]["digest"] == reg.releases[1].digest
    assert [a["label"] for a in r2["lineage"]["ancestors"]] == ["origin", "release 1"]
    assert all(set(b["accuracy"]) == {"origin", "release 1", "new"} for b in r2["lineage"]["budgets"])
    assert {c["against"] for c in r2["capabilities"] if c["name"].endswith("(budget)")} <= {"origin", "release 1"}
    # the stored result is the run's, byte for byte
    stored = registry / "releases" / "0002" / "result.json"
    assert stored.read_bytes() == (root / "c2" / "run" / "result.json").read_bytes()
    res = _cli("lineage", "verify", registry)
    assert res.exit_code == 0, res.output
    # the report's lineage section: the chain ending in this run, the chart, the budgets
    html = (root / "c2" / "run" / "report.html").read_text()
    section = html.split('<section id="lineage">', 1)[1].split("</section>", 1)[0]
    assert all(d in section for d in (reg.releases[0].digest, reg.releases[1].digest, reg.releases[2].digest))
    assert 'release 2 <span class="muted small">(this run)</span>' in section and "<svg" in section
    assert "Drift budgets" in section and section.count("<tr>") >= 3 + len(r2["lineage"]["budgets"])


def test_a_class_gained_earlier_stays_protected_and_a_run_that_loses_it_is_not_released(lineage_runs, small_world):
    """Cycle 3 improves cow and its spec protects neither dog (release 1's gain) nor cat (release 2's): both
    are carried at lineage.carry_tolerance; cat loses more than that (17.5 points on one platform's bits, a
    quarter on another's: 0.1 leaves both clear), so the run is refused and the registry stays as it was."""
    root, registry, runs = lineage_runs
    before = {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()}
    others = ["bear", "bird", "elephant", "giraffe", "horse", "sheep", "zebra"]
    c3 = _cycle(
        root,
        small_world,
        "c3",
        "cow",
        registry,
        protect=[{"classes": others, "each": True, "tolerance": 0.6}],
        lineage={"carry_tolerance": 0.1},
    )
    assert c3["exit"] == 1, c3["output"]
    result = c3["result"]
    carried = {c["name"]: c["from_release"] for c in result["lineage"]["carried"]}
    assert carried == {"dog": "release 1", "cat": "release 2"}  # where each was last improved
    caps = {c["name"]: c for c in result["capabilities"]}
    assert caps["cat"]["tolerance"] == 0.1 and caps["cat"]["status"] == "violated"
    assert result["lineage"]["release"] is None and "not certified" in result["lineage"]["registration"]
    assert {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()} == before


def test_a_registration_that_fails_fails_the_run_and_leaves_a_valid_registry(lineage_runs, small_world, monkeypatch):
    """A certified cycle whose registration breaks off (the disk fills as the index is replaced): the run
    fails closed (no result.json, state 'failed', exit 2) and the registry's index is the one before."""
    root, registry, _ = lineage_runs
    index = (registry / "index.json").read_bytes()

    def full(self, releases):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Registry, "_write_index", full)
    # the widest budget: what is under test is the registration, so the cycle must be certified whatever a
    # platform's float kernels make of an unconstrained run against the lineage (0.6 lost zebra on one)
    run = _cycle(root, small_world, "c4", "bird", registry, steps=CAT_STEPS, budget=1.0)
    assert run["exit"] == 2 and "No space left on device" in run["output"], run["output"]
    assert run["result"] is None
    state = json.loads((root / "c4" / "run" / "state.json").read_text())
    assert state["state"] == "failed"
    assert (registry / "index.json").read_bytes() == index
    monkeypatch.undo()
    assert _cli("lineage", "verify", registry).exit_code == 0


# ------------------------------------------------------------------------------ the two-cycle demo's parts
def test_a_world_with_a_second_target_holds_back_its_images_for_the_second_cycle(tmp_path):
    """WorldConfig.second_target: only second_in_base of its images reach v1's training data; the rest are
    target2.csv's positives, with a store (protected2.csv) that holds the first target too. Without it a
    world's recipe, and so its digest, is what it was."""
    from conftest import SMALL_WORLD

    from safespec.demo import WorldConfig, build_world
    from safespec.demo.cycles import LINEAGE_WORLD

    assert "second_target" not in WorldConfig().to_dict() and LINEAGE_WORLD.to_dict()["second_target"] == "bird"
    config = dataclasses.replace(SMALL_WORLD, second_target="bird", second_in_base=10)
    w = build_world(tmp_path / "world", config, progress=False, log=None)
    classes = list(w.classes)
    m = {s: read_manifest(p, classes) for s, p in w.manifests.items()}
    base, target2, store2 = m["base"].counts(), m["target2"].counts(), m["protected2"].counts()
    assert base["bird"] <= 2 * 10 and target2["bird"] > 10 and store2["dog"] > base["dog"]
    assert "bird" not in store2 or store2["bird"] == 0
    assert all(0 < target2[c] <= SMALL_WORLD.target_negatives_per_class for c in classes if c != "bird")
    held = {r.path for r in m["heldout"].records} | {r.path for r in m["validation"].records}
    assert not held & ({r.path for r in m["target2"].records} | {r.path for r in m["protected2"].records})
    assert build_world(tmp_path / "world", config, progress=False, log=None).reused  # digests cover both


def test_the_demo_lineage_specs_are_the_demo_spec_plus_a_lineage(tmp_path):
    from safespec.demo.cycles import lineage_specs

    specs = Path(__file__).resolve().parents[1] / "specs"
    first, second = lineage_specs(specs / "demo.yaml", specs / "demo-cycle2.yaml", tmp_path)
    demo = yaml.safe_load((specs / "demo.yaml").read_text())
    v2, v3 = yaml.safe_load(first.read_text()), yaml.safe_load(second.read_text())
    assert v2["optimize"] == demo["optimize"] and v2["target"] == demo["target"]
    world = Path(v3["data"]["heldout"]).parent  # cycle 1 runs on the second cycle's world (bird starved too)
    assert world.name == "world-lineage" and Path(v2["data"]["heldout"]).parent == world
    assert v2["model"]["checkpoint"] == str(world / "models" / "v1.safetensors")
    assert v2["protect"][0]["budget"] == v3["protect"][0]["budget"] == 0.05
    assert v2["lineage"]["dir"] == v3["lineage"]["dir"] == str(tmp_path / "registry")
    assert v3["model"]["from"] == "lineage" and v3["target"]["class"] == "bird"
    for path in (first, second):
        res = _cli("validate", "--no-data-check", path)
        assert res.exit_code == 0, res.output


def test_verify_certifies_against_the_lineage_without_releasing(lineage_runs):
    """`safespec verify` of a spec in a lineage certifies the budgets against every ancestor too, and never
    registers anything."""
    root, registry, runs = lineage_runs
    before = {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()}
    reg = Registry.open(registry)
    latest = reg.releases[-1]
    out = root / "verify-latest"
    res = _cli("verify", runs["c2"]["spec"], "--candidate", reg.model_path(latest), "--out", out, "--quiet")
    assert res.exit_code in (0, 1), res.output
    result = json.loads((out / "result.json").read_text())
    assert "without releasing" in result["lineage"]["registration"] and result["lineage"]["release"] is None
    assert [a["label"] for a in result["lineage"]["ancestors"]] == ["origin", "release 1", "release 2"]
    assert set(result["lineage"]["accuracy"]) == {"origin", "release 1", "release 2", "new"}
    assert result["lineage"]["accuracy"]["release 2"] == result["lineage"]["accuracy"]["new"]
    assert {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()} == before


def test_an_unwritable_registry_is_one_line(tmp_path):
    """A registry whose folder cannot be created fails with one line naming it, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    reg = Registry(blocker / "registry")  # a folder inside a file cannot exist
    with pytest.raises(LineageError, match="cannot write the lineage registry"), reg.locked():
        pass


def test_a_cycle_that_does_not_start_from_the_latest_release_is_refused_before_training(lineage_runs, small_world):
    """A lineage is a chain: a cycle from v1 (not the latest release) would fork it, so it stops with one
    line before training, and the registry stays as it was."""
    root, registry, _ = lineage_runs
    before = {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()}
    run = _cycle(root, small_world, "from-v1", "cat", registry, first=True)
    assert run["exit"] == 2, run["output"]
    lines = run["output"].strip().splitlines()
    assert len(lines) == 1 and "is not the lineage's latest release, release 2" in lines[0], lines
    assert "model.from: lineage" in lines[0] and run["result"] is None
    assert not (root / "from-v1" / "run" / "trajectory.jsonl").exists()
    assert {p: p.read_bytes() for p in sorted(registry.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_release_is_readable_as_the_umask_says(tmp_path, umask):
    """A release's folder and files follow the registering user's umask, as the run's outputs do: a team
    reading one registry needs group access, and a private registry stays private."""
    before = os.umask(umask)
    try:
        reg = Registry(tmp_path / "registry")
        with reg.locked():
            origin = _add(reg, tmp_path, 0, parent=None)
            _add(reg, tmp_path, 1, parent=origin.digest)
    finally:
        os.umask(before)
    folders = [p for p in reg.path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    release_files = [f for d in folders for f in d.rglob("*") if f.is_file()]
    assert release_files, "a release with a spec and run files"
    for f in release_files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f, oct(f.stat().st_mode))
    for d in folders:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, (d, oct(d.stat().st_mode))
