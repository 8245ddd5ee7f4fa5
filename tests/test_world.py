"""The embedded demo world: safe loading of Animal-MNIST, disjoint splits, v1's accuracy, the cache."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from safespec.demo import world as world_mod
from safespec.data import check_disjoint, read_manifest
from safespec.errors import DataError
from safespec.demo import (
    ANIMAL_CLASSES,
    WorldConfig,
    animal_mnist_files,
    build_world,
    deduplicate,
    load_animal_mnist,
    load_numpy_pickle,
    plan_splits,
)


# ------------------------------------------------------------------------------------------ safe loading
def test_restricted_unpickler_accepts_plain_arrays():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for proto in (3, 4, 5):  # protocol 2 encodes bytes through _codecs.encode: refused, not needed
        b = load_numpy_pickle(pickle.dumps(a, protocol=proto), "x.pkl")
        assert b.dtype == np.uint8 and np.array_equal(a, b)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "obj, name",
    [
        (Boom(), "system"),
        ({"a": np.zeros(2)}, None),  # not an array
        (np.array([object(), 1], dtype=object), None),
        (np.zeros(3, dtype=[("a", "i4")]).view(np.recarray), "recarray"),
    ],
)
def test_restricted_unpickler_refuses_everything_else(obj, name):
    data = pickle.dumps(obj)
    with pytest.raises(DataError) as e:
        load_numpy_pickle(data, "evil.pkl")
    msg = str(e.value)
    assert msg.startswith("evil.pkl: ") and "\n" not in msg
    if name:
        assert f".{name}: only plain numpy arrays" in msg


def test_malicious_pickle_does_not_run(tmp_path: Path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(type("X", (), {"__reduce__": lambda self: (os.mkdir, (str(marker),))})())
    with pytest.raises(DataError, match="refusing to unpickle (posix|nt).mkdir"):
        load_numpy_pickle(evil, "evil.pkl")
    assert not marker.exists()


def test_animal_mnist_is_found_without_importing_it():
    files = animal_mnist_files()
    assert set(files) == {"images", "labels"} and all(p.is_file() for p in files.values())
    assert "animal_mnist" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps animal-mnist==0\.4"):
        animal_mnist_files()


@pytest.fixture(scope="module")
def unique():
    images, labels, info = load_animal_mnist()
    return images, labels, info, deduplicate(images, labels, 0.12)


def test_animal_mnist_contents_and_deduplication(unique):
    images, labels, info, keep = unique
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert info["images"].startswith("sha256:")
    flat = images[keep].reshape(len(keep), -1)
    assert len(np.unique(flat, axis=0)) == len(keep)  # no exact duplicates left
    assert 9650 < len(keep) <= 10000 - 284  # the data set holds 284 exact duplicates


def test_plan_splits_respects_counts_and_is_disjoint(unique):
    images, labels, _, keep = unique
    cfg = WorldConfig()
    p = plan_splits(labels, keep, cfg)
    for c in ANIMAL_CLASSES:
        assert len(p.heldout[c]) == 400 and len(p.validation[c]) == 100
        parts = [set(p.heldout[c]), set(p.validation[c]), set(p.base[c])]
        assert sum(map(len, parts)) == len(set().union(*parts))
        if c != "dog":
            assert len(p.base[c]) + len(p.mirrors[c]) >= 500  # the protected store floor
    assert len(p.base["dog"]) == cfg.target_in_base
    assert not set(p.target_pos) & (set(p.base["dog"]) | set(p.heldout["dog"]) | set(p.validation["dog"]))
    p2 = plan_splits(labels, keep, cfg)
    assert all(np.array_equal(p.heldout[c], p2.heldout[c]) for c in ANIMAL_CLASSES)


# ------------------------------------------------------------------------------------------ the small world
def test_small_world_layout(small_world, small_world_config):
    w, cfg = small_world, small_world_config
    assert set(w.manifests) == {"base", "protected", "target", "validation", "heldout"}
    m = {s: read_manifest(p, ANIMAL_CLASSES) for s, p in w.manifests.items()}
    assert all(n == cfg.heldout_per_class for n in m["heldout"].counts().values())
    assert all(n == cfg.validation_per_class for n in m["validation"].counts().values())
    store = m["protected"].counts()
    assert store["dog"] == 0 and all(store[c] == cfg.store_min_per_class for c in ANIMAL_CLASSES if c != "dog")
    assert m["base"].counts()["dog"] == cfg.target_in_base
    tc = m["target"].counts()
    assert tc["dog"] == cfg.target_positives and tc["cat"] == cfg.target_negatives_per_class
    assert set(m["target"].captions) == {f"a photo of a {c}." for c in ANIMAL_CLASSES}
    # images: 28x28 grey PNGs under images/<split>/<class>/
    p = m["heldout"].paths[0]
    assert p.relative_to(w.root.resolve()).parts[:3] == ("images", "heldout", "bear")
    from PIL import Image

    with Image.open(p) as im:
        assert im.size == (28, 28) and im.mode == "L"
    # held-out and validation share nothing with the training splits, by file or content; target
    # negatives are base-train images by design
    check_disjoint(m, pairs=[(a, b) for a in m for b in ("validation", "heldout") if a != b])
    with pytest.raises(DataError, match="splits 'base' and 'target' overlap"):
        check_disjoint({"base": m["base"], "target": m["target"]})
    meta = json.loads((w.root / "world.json").read_text())
    assert meta["v1"]["heads"] is False and meta["manifests"]["heldout"]["digest"] == w.digests["heldout"]


def test_small_world_v1_is_a_real_classifier(small_world):
    """v1, loaded back from its checkpoint the way a spec loads the old model, classifies held-out images
    well above chance (0.1); its recorded accuracies are what it really achieves."""
    from safespec.plan import ModelPlan
    from safespec.model import load_model
    from safespec.demo import evaluate_accuracy

    w = small_world
    mp = ModelPlan(
        arch=w.config.arch,
        pretrained=None,
        checkpoint=str(w.v1_checkpoint),
        heads=True,
        rank=8,
        device="cpu",
        precision="fp32",
        freeze=(),
    )
    loaded = load_model(mp, ANIMAL_CLASSES)
    acc = evaluate_accuracy(loaded, read_manifest(w.manifests["heldout"], ANIMAL_CLASSES), w.templates)
    assert acc == pytest.approx(w.v1_accuracy, abs=1e-6)
    mean = float(np.mean(list(acc.values())))
    assert mean >= 0.40, acc
    assert sum(a > 0.2 for a in acc.values()) >= 6, acc


def test_v1_is_saved_without_heads_and_training_is_deterministic(small_world, small_world_config, tmp_path):
    from safespec.model import read_checkpoint_metadata
    from safespec.demo import train_v1

    meta = read_checkpoint_metadata(small_world.v1_checkpoint)
    assert meta["has_heads"] is False and meta["arch"] == small_world_config.arch
    cfg = dataclasses.replace(small_world_config, steps=4, warmup_steps=2)
    base = read_manifest(small_world.manifests["base"], ANIMAL_CLASSES)
    val = read_manifest(small_world.manifests["validation"], ANIMAL_CLASSES)
    quiet = dict(progress=False, log=lambda *_: None)
    a = train_v1(tmp_path / "a", base, val, cfg, **quiet)
    b = train_v1(tmp_path / "b", base, val, cfg, **quiet)
    c = train_v1(tmp_path / "c", base, val, dataclasses.replace(cfg, seed=1), **quiet)
    assert a["digest"] == b["digest"] and a["heldout_accuracy"] == b["heldout_accuracy"]
    assert c["digest"] != a["digest"]


def test_second_build_reuses_the_cache(small_world, small_world_config):
    w = small_world
    mtime = w.v1_checkpoint.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_world(w.root, small_world_config, progress=False, log=lambda *_: None)
    assert again.reused and not w.reused
    assert time.perf_counter() - t0 < 5.0
    assert w.v1_checkpoint.stat().st_mtime_ns == mtime
    assert again.v1_accuracy == w.v1_accuracy and again.digests == w.digests


def test_damaged_world_is_rebuilt_and_foreign_folders_are_refused(
    small_world, small_world_config, tmp_path, monkeypatch
):
    copy = tmp_path / "world"
    shutil.copytree(small_world.root, copy)
    logs: list[str] = []
    img = read_manifest(copy / "heldout.csv", ANIMAL_CLASSES).paths[3]
    img.write_bytes(img.read_bytes()[:-3] + b"\x00\x00\x00")
    assert world_mod._reusable(copy, small_world_config) == "the heldout split changed on disk"
    other = dataclasses.replace(small_world_config, templates=("a photo of a {}.",), seed=1)
    assert "another configuration" in world_mod._reusable(copy, other)

    # a rebuild replaces the world atomically; stub the slow part to check the swap only
    def fake_build(out, config, **kw):
        (out / "world.json").write_text("{}")

    monkeypatch.setattr(world_mod, "_build", fake_build)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".world.building-{dead.pid}").mkdir()  # left by a killed build
    monkeypatch.setattr(world_mod, "_load_world", lambda root, reused: ("loaded", reused))
    assert build_world(copy, small_world_config, progress=False, log=logs.append) == ("loaded", False)
    assert "heldout split changed" in logs[0]
    assert sorted(os.listdir(copy)) == ["world.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="is not a safespec demo world"):
        build_world(foreign, small_world_config, progress=False, log=logs.append)
    assert (foreign / "notes.txt").read_text() == "precious"
