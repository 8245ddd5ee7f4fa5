"""The release cycle end to end on the small world: exit codes, the run directory, fail-closed behaviour."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from safespec.cli import main
from world_spec import write_world_spec


def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def unconstrained_run(small_world, tmp_path_factory):
    """One unconstrained fine-tune of the small world: it learns the target and forgets."""
    folder = tmp_path_factory.mktemp("unconstrained")
    spec = write_world_spec(folder, small_world, method="unconstrained", steps=120)
    res = _cli("run", str(spec), "--quiet")
    return folder, spec, res


def test_run_writes_a_complete_run_directory(unconstrained_run):
    folder, spec, res = unconstrained_run
    run = folder / "run"
    result = json.loads((run / "result.json").read_text())
    assert res.exit_code == (0 if result["verdict"] == "certified" and result["target"]["goal_met"] else 1)
    assert json.loads((run / "state.json").read_text())["state"] == "complete"
    for name in ("report.html", "junit.xml", "trajectory.jsonl", "models/unconstrained.safetensors"):
        assert (run / name).is_file(), name
    assert result["schema_version"] == 1 and result["method"] == "unconstrained"
    assert len(result["capabilities"]) == 9
    assert result["provenance"]["new_model"]["digest"] != result["provenance"]["old_model"]["digest"]
    HTMLParser().feed((run / "report.html").read_text())
    # the summary names every capability, one line each
    assert sum(c["name"] in res.output for c in result["capabilities"]) == 9


def test_unconstrained_fine_tune_forgets_and_verify_says_so(unconstrained_run, tmp_path):
    folder, spec, _ = unconstrained_run
    run = folder / "run"
    res = _cli(
        "verify",
        str(spec),
        "--candidate",
        str(run / "models" / "unconstrained.safetensors"),
        "--out",
        str(tmp_path / "verify"),
        "--quiet",
    )
    assert res.exit_code == 1, res.output
    result = json.loads((tmp_path / "verify" / "result.json").read_text())
    assert result["verdict"] == "not_certified"
    violated = [c["name"] for c in result["capabilities"] if c["status"] == "violated"]
    assert violated, [(c["name"], c["status"], c["accuracy_change"]) for c in result["capabilities"]]
    assert result["target"]["new_accuracy"] > result["target"]["old_accuracy"]


def test_verify_of_the_old_model_itself_changes_nothing(small_world, tmp_path):
    spec = write_world_spec(tmp_path, small_world)
    res = _cli("verify", str(spec), "--candidate", str(small_world.v1_checkpoint), "--out", str(tmp_path / "v"), "-q")
    result = json.loads((tmp_path / "v" / "result.json").read_text())
    assert all(c["negative_flips"] == 0 and c["positive_flips"] == 0 for c in result["capabilities"])
    assert all(c["status"] == "certified" for c in result["capabilities"]), res.output
    assert result["verdict"] == "certified"
    # ...but the old model does not reach the target's goal, so it is no release: exit 1
    assert not result["target"]["goal_met"] and res.exit_code == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_are_readable_as_the_umask_says(small_world, tmp_path, umask):
    """The atomic write's temporary file is private; the renamed outputs must not stay so (a teammate or a
    CI artifact step running as another user reads the audit report)."""
    import os
    import stat

    spec = write_world_spec(tmp_path, small_world)
    before = os.umask(umask)
    try:
        res = _cli(
            "verify", str(spec), "--candidate", str(small_world.v1_checkpoint), "--out", str(tmp_path / "v"), "-q"
        )
    finally:
        os.umask(before)
    assert res.exit_code == 1, res.output  # v1 itself: certified, goal not met
    for name in ("result.json", "report.html", "junit.xml", "state.json"):
        mode = stat.S_IMODE((tmp_path / "v" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))
    assert not list((tmp_path / "v").glob(".*.tmp"))


def test_an_interrupted_run_leaves_no_result_and_removes_a_stale_certified_one(small_world, tmp_path, monkeypatch):
    spec = write_world_spec(tmp_path, small_world, steps=30)
    run = tmp_path / "run"
    run.mkdir()
    # a certified result and report from an earlier run must not survive a failed one
    (run / "result.json").write_text(json.dumps({"verdict": "certified"}))
    (run / "report.html").write_text("<h1>CERTIFIED</h1>")
    (run / "junit.xml").write_text("<testsuite/>")

    from safespec import train

    calls = {"n": 0}
    real = train.Trainer.train_step

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(train.Trainer, "train_step", interrupted)
    res = CliRunner().invoke(main, ["run", str(spec), "--quiet"])
    assert res.exit_code == 130
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "failed" and state["reason"] == "interrupted"
    assert not (run / "result.json").exists()
    assert not (run / "report.html").exists() and not (run / "junit.xml").exists()
    # and the report command refuses to render a failed run
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 2 and "fail" in res.output.lower()


def _verify_counting_decodes(spec, candidate, out, cache, monkeypatch):
    from safespec.api import verify_candidate
    from safespec.data import images as images_mod

    decoded = []
    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda m, i: decoded.append(i) or real(m, i))
    result = verify_candidate(spec, candidate, out=out, cache_dir=cache, command="test", log=lambda s: None)
    monkeypatch.setattr(images_mod, "load_image", real)
    return result, len(decoded)


def test_a_second_verify_reads_the_held_out_images_from_the_cache(small_world, tmp_path, monkeypatch):
    """A release pipeline verifies every candidate against the same held-out split: its images are decoded
    once per split and preprocessing, and the certificate is the same either way."""
    spec = write_world_spec(tmp_path, small_world)
    n = sum(1 for _ in small_world.manifests["heldout"].read_text().splitlines()) - 1
    cache = tmp_path / "cache"
    first, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "a", cache, monkeypatch)
    assert decoded == n and len(list((cache / "images").glob("*.npy"))) == 1
    second, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "b", cache, monkeypatch)
    assert decoded == 0
    assert second["capabilities"] == first["capabilities"] and second["per_class"] == first["per_class"]
    # a damaged entry, or one of another shape, is decoded again, never trusted
    import numpy as np

    entry = next((cache / "images").glob("*.npy"))
    entry.write_bytes(entry.read_bytes()[:100])
    third, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "c", cache, monkeypatch)
    assert decoded == n and third["capabilities"] == first["capabilities"]
    np.save(entry, np.zeros((3, 3, 32, 32), dtype=np.float32), allow_pickle=False)
    fourth, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "d", cache, monkeypatch)
    assert decoded == n and fourth["capabilities"] == first["capabilities"]
    # a cache that cannot be written (here: a full disk) costs the decoding, not the verify
    entry.unlink()
    import safespec.evaluate as evaluate_mod

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_mod, "atomic_write_bytes", full)
    fifth, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "e", cache, monkeypatch)
    assert decoded == n and fifth["capabilities"] == first["capabilities"]
    assert not list((cache / "images").glob("*.npy"))
    # nor does a full disk under the predictions' cache: they are computed and not kept
    empty = tmp_path / "empty-cache"
    sixth, decoded = _verify_counting_decodes(spec, small_world.v1_checkpoint, tmp_path / "f", empty, monkeypatch)
    assert decoded == n and sixth["capabilities"] == first["capabilities"]
    assert not [p for p in empty.rglob("*") if p.is_file()]


def test_cached_images_are_mapped_copy_on_write(tmp_path):
    """The cache hands out the stored images mapped, not read: the same values, a writable tensor (no
    warning from torch), and writing to it never changes the stored entry."""
    import hashlib
    import warnings

    import torch

    from safespec.evaluate import PredictionCache

    cache = PredictionCache(tmp_path)
    images = torch.rand(5, 3, 4, 4)
    cache.put_images("k", images)
    entry = next(tmp_path.rglob("*.npy"))
    before = hashlib.sha256(entry.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cache.images("k", 5)
        assert got is not None and torch.equal(got, images)
        got[0].zero_()  # a private copy of the page, never the file
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == before
    again = cache.images("k", 5)
    assert again is not None and torch.equal(again, images)
    assert cache.images("k", 6) is None  # another split's size: not trusted


def test_the_images_key_follows_the_data_and_the_preprocessing():
    from safespec.evaluate import images_key

    pp = {"size": (32, 32), "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    assert images_key("sha256:a", pp) == images_key("sha256:a", dict(pp))
    assert images_key("sha256:a", pp) != images_key("sha256:b", pp)
    assert images_key("sha256:a", pp) != images_key("sha256:a", {**pp, "size": (64, 64)})
    assert images_key("sha256:a", pp) != images_key("sha256:a", {**pp, "interpolation": "bilinear"})


def test_verify_with_an_unreadable_held_out_image_fails_closed(small_world, tmp_path):
    """An image that cannot be read ends verify with the one line that names its manifest row, exit 2,
    and no result."""
    spec = write_world_spec(tmp_path, small_world)
    manifest = small_world.manifests["heldout"]
    lines = manifest.read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    root = manifest.parent
    rows = [lines[0]] + [f"{root / r.rsplit(',', 1)[0]},{r.rsplit(',', 1)[1]}" for r in lines[1:]]
    k = len(rows) - 3
    rows[k] = f"{broken},{rows[k].rsplit(',', 1)[1]}"
    bad = tmp_path / "heldout.csv"
    bad.write_text("\n".join(rows) + "\n")
    spec.write_text(spec.read_text().replace(str(manifest), str(bad)))
    out = tmp_path / "v"
    args = ["verify", str(spec), "--candidate", str(small_world.v1_checkpoint), "--out", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and f"heldout.csv:row {k + 1}: cannot read image {broken}" in line, line
    assert not (out / "result.json").exists() and not (out / "report.html").exists()
    assert json.loads((out / "state.json").read_text())["state"] == "failed"


def test_a_store_without_a_protected_class_names_the_class(small_world, tmp_path):
    spec = write_world_spec(tmp_path, small_world)
    store = small_world.manifests["protected"]
    root = store.parent
    lines = store.read_text().splitlines()
    rows = [lines[0]] + [
        f"{root / r.rsplit(',', 1)[0]},{r.rsplit(',', 1)[1]}" for r in lines[1:] if not r.endswith(",cow")
    ]
    bad = tmp_path / "store.csv"
    bad.write_text("\n".join(rows) + "\n")
    spec.write_text(spec.read_text().replace(str(store), str(bad)))
    res = CliRunner().invoke(main, ["run", str(spec), "--quiet"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "no images of protected class 'cow'" in line and "Traceback" not in line, line


def test_a_run_that_fails_on_bad_data_exits_2_with_one_line(small_world, tmp_path):
    spec = write_world_spec(tmp_path, small_world)
    manifest = small_world.manifests["heldout"]
    bad = tmp_path / "heldout.csv"
    lines = manifest.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",unicorn"
    # paths in the manifest are relative to it: keep them valid by writing next to the original
    bad = manifest.parent / "heldout-bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    try:
        text = spec.read_text().replace(str(manifest), str(bad))
        spec.write_text(text)
        res = CliRunner().invoke(main, ["run", str(spec), "--quiet"])
    finally:
        bad.unlink()
    assert res.exit_code == 2
    assert "heldout-bad.csv:row 4" in res.output and "unicorn" in res.output
    assert "Traceback" not in res.output


def test_a_target_tower_run_moves_only_the_target_and_verify_reproduces_it(small_world, tmp_path):
    """model.target_tower end to end: the saved model carries its tower, every flip it makes is into or out
    of the target class, and verify (which reloads the checkpoint) gets the run's own numbers."""
    spec = write_world_spec(tmp_path, small_world, method="unconstrained", steps=40)
    data = __import__("yaml").safe_load(spec.read_text())
    data["model"]["target_tower"] = True
    spec.write_text(__import__("yaml").safe_dump(data, sort_keys=False))
    res = _cli("run", str(spec), "--quiet")
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert res.exit_code in (0, 1), res.output
    from safespec.model import read_checkpoint_metadata

    assert read_checkpoint_metadata(run / "models" / "unconstrained.safetensors")["class_towers"] == [
        small_world.config.target
    ]
    # an unconstrained tower forgets, but only into the target: every protected image it loses goes there
    assert result["flips"], "the unconstrained tower flipped no protected image: the test shows nothing"
    assert {f["new_pred"] for f in result["flips"]} == {small_world.config.target}
    again = _cli(
        "verify",
        str(spec),
        "--candidate",
        str(run / "models" / "unconstrained.safetensors"),
        "--out",
        str(tmp_path / "verify"),
        "--quiet",
    )
    assert again.exit_code == res.exit_code, again.output
    checked = json.loads((tmp_path / "verify" / "result.json").read_text())
    assert [(c["name"], c["negative_flips"], c["positive_flips"]) for c in checked["capabilities"]] == [
        (c["name"], c["negative_flips"], c["positive_flips"]) for c in result["capabilities"]
    ]
    assert checked["target"]["new_accuracy"] == result["target"]["new_accuracy"]


def test_a_candidate_that_kept_the_image_tower_is_verified_from_its_cached_features(small_world, tmp_path, monkeypatch):
    """A candidate whose image tower is v1's bit for bit (model.freeze: [image]) is evaluated from v1's
    held-out image features, one image pass for both; one whose image tower moved is encoded itself. The
    same certificate either way."""
    import copy

    import torch

    import safespec.runner as runner_mod
    from safespec.api import load_inputs, verify_candidate
    from safespec.evaluate import same_visual, visual_digest
    from safespec.model import load_model, save_checkpoint

    spec = write_world_spec(tmp_path, small_world)
    plan = load_inputs(spec, log=lambda s: None).plan
    old = load_model(plan.model, plan.classes)
    text_moved, image_moved = copy.deepcopy(old.model), copy.deepcopy(old.model)
    with torch.no_grad():
        next(p for k, p in text_moved.named_parameters() if k.startswith("clip.transformer.")).add_(1e-3)
        next(p for k, p in image_moved.named_parameters() if k.startswith("clip.visual.")).add_(1e-3)
    assert same_visual(old.model, text_moved) and visual_digest(old.model) == visual_digest(text_moved)
    assert not same_visual(old.model, image_moved) and visual_digest(old.model) != visual_digest(image_moved)

    passes = []
    real = runner_mod.image_features
    monkeypatch.setattr(runner_mod, "image_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    results = {}
    for name, model in (("text", text_moved), ("image", image_moved)):
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(model, path, {"test": name})
        passes.clear()
        results[name] = verify_candidate(
            spec, path, out=tmp_path / name, cache_dir=tmp_path / f"cache-{name}", command="test", log=lambda s: None
        )
        results[name + "-passes"] = len(passes)
    assert results["text-passes"] == 1 and results["image-passes"] == 0
    # the features path gives the predictions an encoding of every image gives
    monkeypatch.setattr(runner_mod, "same_visual", lambda a, b: False)
    plain = verify_candidate(
        spec,
        tmp_path / "text.safetensors",
        out=tmp_path / "plain",
        cache_dir=tmp_path / "c3",
        command="test",
        log=lambda s: None,
    )
    assert plain["capabilities"] == results["text"]["capabilities"]
    assert plain["per_class"] == results["text"]["per_class"]


def test_a_run_says_up_front_what_its_held_out_split_lets_a_release_lose(small_world, tmp_path):
    import numpy as np

    from safespec.api import load_inputs
    from safespec.certify import stats
    from safespec.runner import heldout_evidence

    plan = load_inputs(write_world_spec(tmp_path, small_world), log=lambda s: None).plan
    protected = list(plan.constraints)
    labels = np.repeat(np.arange(len(plan.classes)), 400)
    lines = heldout_evidence(plan, labels)
    tol, conf = protected[0].tolerance, protected[0].confidence
    allowed = stats.flip_allowance(400, tol, conf, plan.certify.test)
    assert len(lines) == 1 and lines[0].startswith("held-out evidence: 400 images each for ")
    assert f"at most {allowed} negative flip" in lines[0]
    # one capability with too few images: a warning of its own, naming it and what it would need
    few = protected[0].class_indices[0]
    labels = np.concatenate([labels[labels != few], np.full(5, few)])
    lines = heldout_evidence(plan, labels)
    warn = [line for line in lines if line.startswith("warning: ")]
    need = stats.min_informative_n(tol, conf, plan.certify.test)
    assert len(warn) == 1 and f"5 held-out images each for {protected[0].name!r}" in warn[0]
    assert f"{need} or more needed" in warn[0] and len(lines) == 2
