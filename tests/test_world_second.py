"""The world's data sources and the second world (Fashion-MNIST, bench and tests only): the registry, the
default world's digest, the missing-data error, a tiny build of the second world, and its spec."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from safespec.demo import world as world_mod
from safespec.data import check_disjoint, read_manifest
from safespec.errors import DataError
from safespec.demo import (
    ANIMAL_CLASSES,
    FASHION_CLASSES,
    FASHION_ENV,
    FASHION_FILES,
    FASHION_TRAIN_FILES,
    SOURCES,
    WorldConfig,
    build_world,
    deduplicate,
    fashion_mnist_files,
    get_source,
    load_fashion_mnist,
    plan_splits,
    read_idx,
)

#: The demo world's digest before data sources existed (commit 1d4fb39), for its recipe of then (a tiny ViT,
#: 2,400 steps on one thread): a world built with that recipe is keyed by it still, so it must not change.
DEMO_DIGEST = "sha256:338d6f1dce7e5ffb045b0631148a8b8591b639c737f1e27d51ee67920e217103"
TINY_RECIPE = {"arch": "safespec-tiny-vit", "steps": 2400, "warmup_steps": 240, "threads": 1}


def _have_fashion() -> bool:
    try:
        fashion_mnist_files()
    except DataError:
        return False
    return True


needs_fashion = pytest.mark.skipif(not _have_fashion(), reason="Fashion-MNIST files not installed (`make install`)")


def _have_fashion_train() -> bool:
    try:
        fashion_mnist_files(FASHION_TRAIN_FILES)
    except DataError:
        return False
    return True


needs_fashion_train = pytest.mark.skipif(
    not _have_fashion_train(), reason="Fashion-MNIST's training split not installed (`make install`)"
)


@needs_fashion_train
def test_the_tuning_source_is_the_training_split_and_shares_no_image_with_the_second_worlds():
    """The tuning world (bench only) reads Fashion-MNIST's training split: 6,000 images per class, none of
    them byte-identical to an image of the test split the second world is built from."""
    import hashlib

    import numpy as np

    train, train_labels, info = get_source("fashion-mnist-train").load()
    test, _, _ = get_source("fashion-mnist").load()
    assert train.shape == (60000, 28, 28) and np.bincount(train_labels).tolist() == [6000] * 10
    assert info["images"].startswith("sha256:")
    digest = lambda a: {hashlib.sha256(x.tobytes()).digest() for x in a}  # noqa: E731
    assert not digest(train) & digest(test)


# ------------------------------------------------------------------------------------------ config and registry
def test_default_world_digest_is_unchanged():
    cfg = WorldConfig(**TINY_RECIPE)
    assert cfg.source == "animal-mnist" and "source" not in cfg.to_dict() and "threads" not in cfg.to_dict()
    assert cfg.digest() == DEMO_DIGEST
    # today's recipe (issue 15: a smaller tower on two threads) is another world, with threads in its digest
    assert WorldConfig().to_dict()["threads"] == 2 and WorldConfig().digest() != DEMO_DIGEST
    # a world.json written before sources existed reads back as the same config
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    second = WorldConfig(source="fashion-mnist", target="pullover")
    assert second.to_dict()["source"] == "fashion-mnist" and second.digest() != DEMO_DIGEST
    assert WorldConfig.from_dict(json.loads(json.dumps(second.to_dict()))) == second


def test_sources_name_their_classes():
    assert set(SOURCES) == {"animal-mnist", "fashion-mnist", "fashion-mnist-train"}
    assert get_source("fashion-mnist-train").classes == FASHION_CLASSES
    assert get_source("animal-mnist").classes == ANIMAL_CLASSES
    assert get_source("fashion-mnist").classes == FASHION_CLASSES and len(set(FASHION_CLASSES)) == 10
    cfg = WorldConfig(source="fashion-mnist", target="pullover")
    assert cfg.classes == FASHION_CLASSES
    assert cfg.protected == tuple(c for c in FASHION_CLASSES if c != "pullover") and len(cfg.protected) == 9


@pytest.mark.parametrize(
    "kw, msg",
    [
        (
            {"source": "fashion-mnist"},
            "unknown target class 'dog' for source 'fashion-mnist' (expected one of t-shirt,",
        ),
        ({"source": "fashion-mnist", "target": "Pullover"}, "unknown target class 'Pullover'"),
        ({"target": "pullover"}, "unknown target class 'pullover' for source 'animal-mnist'"),
        (
            {"source": "cifar-10"},
            "unknown source 'cifar-10' (expected one of animal-mnist, fashion-mnist, fashion-mnist-train)",
        ),
    ],
)
def test_unknown_target_or_source_is_one_line(kw, msg):
    with pytest.raises(DataError) as e:
        WorldConfig(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_missing_fashion_data_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))  # a folder without the files
    with pytest.raises(DataError) as e:
        fashion_mnist_files()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "make install" in msg and "apt-get install dataset-fashion-mnist" in msg and FASHION_ENV in msg
    # a build needs the files, and says so before writing anything
    root = tmp_path / "w"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_world(root, WorldConfig(source="fashion-mnist", target="pullover"), progress=False, log=None)
    assert not root.exists() and not list(tmp_path.glob(".w.*"))


def _idx(shape: tuple[int, ...], payload: bytes | None = None) -> bytes:
    body = payload if payload is not None else bytes(int(np.prod(shape)))
    return b"\x00\x00\x08" + bytes([len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + body


def test_idx_reader_accepts_unsigned_bytes_only():
    a = read_idx(_idx((2, 3, 4), bytes(range(24))), "x", ndim=3)
    assert a.shape == (2, 3, 4) and a.dtype == np.uint8 and a[1, 2, 3] == 23
    for data, why in [
        (_idx((2, 3, 4))[:-1], "but 23 follow"),  # truncated
        (b"\x00\x00\x0d\x03" + _idx((2, 3, 4))[4:], "not an IDX file of unsigned bytes"),  # floats
        (_idx((24,)), "with 3 dimension"),  # labels where images are expected
        (b"\x00\x00", "not an IDX file"),
    ]:
        with pytest.raises(DataError, match=why):
            read_idx(data, "bad.idx", ndim=3)


@needs_fashion
def test_fashion_mnist_contents(tmp_path, monkeypatch):
    images, labels, info = load_fashion_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert info["images"].startswith("sha256:") and info["version"] == "0.0~git20200523.55506a9-1"
    keep = deduplicate(images, labels, get_source("fashion-mnist").near_duplicate)
    assert 9990 <= len(keep) < 10000  # a few near-identical trousers and bags
    # $SAFESPEC_FASHION_MNIST_DIR points the loader at other copies of the same files
    for p in fashion_mnist_files().values():
        shutil.copy(p, tmp_path / p.name)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    assert set(fashion_mnist_files().values()) == {tmp_path / n for n in FASHION_FILES.values()}
    # and a damaged copy is refused, not misread
    p = tmp_path / FASHION_FILES["labels"]
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5]))
    with pytest.raises(DataError, match="IDX header says"):
        load_fashion_mnist()


@needs_fashion
def test_second_world_plan_counts():
    from bench.worlds import SECOND

    images, labels, _ = load_fashion_mnist()
    p = plan_splits(labels, deduplicate(images, labels, SECOND.near_duplicate), SECOND)
    for c in FASHION_CLASSES:
        assert len(p.heldout[c]) == 400 and len(p.validation[c]) == 60
        assert not set(p.heldout[c]) & (set(p.validation[c]) | set(p.base[c]))
        if c != "pullover":
            assert len(p.base[c]) == 500 and len(p.mirrors[c]) == 0
    assert len(p.base["pullover"]) == 100 and len(p.target_pos) >= 400
    assert not set(p.target_pos) & (set(p.base["pullover"]) | set(p.heldout["pullover"]))


# ------------------------------------------------------------------------------------------ the tiny second world
@pytest.fixture(scope="module")
def second_small(tmp_path_factory):
    if not _have_fashion():
        pytest.skip("Fashion-MNIST files not installed (`make install`)")
    from bench.worlds import SECOND_SMALL

    root = tmp_path_factory.mktemp("second-world") / "world"
    return build_world(root, SECOND_SMALL, progress=False, log=None)


def test_second_world_layout(second_small):
    from bench.worlds import SECOND_SMALL as cfg

    w = second_small
    assert w.classes == FASHION_CLASSES and w.target == "pullover" and w.config == cfg
    m = {s: read_manifest(p, FASHION_CLASSES) for s, p in w.manifests.items()}
    assert all(n == cfg.heldout_per_class for n in m["heldout"].counts().values())
    assert all(n == cfg.validation_per_class for n in m["validation"].counts().values())
    store = m["protected"].counts()
    assert store["pullover"] == 0 and all(store[c] == cfg.store_min_per_class for c in cfg.protected)
    assert m["base"].counts()["pullover"] == cfg.target_in_base
    tc = m["target"].counts()
    assert tc["pullover"] == cfg.target_positives and tc["coat"] == cfg.target_negatives_per_class
    assert set(m["target"].captions) == {f"a photo of a {c}." for c in FASHION_CLASSES}
    assert m["heldout"].paths[0].relative_to(w.root.resolve()).parts[:3] == ("images", "heldout", "t-shirt")
    check_disjoint(m, pairs=[(a, b) for a in m for b in ("validation", "heldout") if a != b])
    meta = json.loads((w.root / "world.json").read_text())
    assert meta["classes"] == list(FASHION_CLASSES) and meta["config"]["source"] == "fashion-mnist"
    assert meta["source"]["package"].startswith("dataset-fashion-mnist") and meta["source"]["licence"] == "MIT"
    assert meta["v1"]["heads"] is False and set(meta["v1"]["heldout_accuracy"]) == set(FASHION_CLASSES)


def test_second_world_is_reused_and_checked(second_small, tmp_path):
    from bench.worlds import SECOND_SMALL

    again = build_world(second_small.root, SECOND_SMALL, progress=False, log=None)
    assert again.reused and again.digests == second_small.digests and again.classes == FASHION_CLASSES
    # the demo world's config does not match a fashion world, and a damaged fashion world is noticed
    assert "another configuration" in world_mod._reusable(second_small.root, WorldConfig())
    copy = tmp_path / "world"
    shutil.copytree(second_small.root, copy)
    img = read_manifest(copy / "validation.csv", FASHION_CLASSES).paths[0]
    img.write_bytes(img.read_bytes()[:-1])
    assert world_mod._reusable(copy, SECOND_SMALL) == "the validation split changed on disk"


def test_spec_for_changes_only_the_world(second_small, tmp_path):
    from bench.worlds import CHANGED, DEMO_SPEC, spec_for
    from safespec.spec import load_spec

    path = spec_for(second_small, out_dir=tmp_path / "spec")
    spec = load_spec(path)  # valid, and every file it names exists
    assert spec.target.class_ == "pullover" and list(spec.classes.names) == list(FASHION_CLASSES)
    assert Path(spec.model.checkpoint) == second_small.v1_checkpoint.resolve()
    new, old = yaml.safe_load(path.read_text()), yaml.safe_load(Path(DEMO_SPEC).read_text())
    assert new["data"]["heldout"] == str(second_small.manifests["heldout"].resolve())
    assert new["report"]["dir"] == str((tmp_path / "spec" / "run").resolve())
    for key in CHANGED:  # take the changed values out; what is left must be the demo spec, value for value
        *parents, leaf = key.split(".")
        a, b = new, old
        for k in parents:
            a, b = a[k], b[k]
        assert a.pop(leaf) != b.pop(leaf)
    assert new == old


def test_cli_prints_v1_accuracy(second_small, capsys):
    from bench.worlds import main

    assert main(["build", "second-small", "--root", str(second_small.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pullover" in out and "(target)" in out
    acc = second_small.v1_accuracy
    assert f"  {'coat':<12} {acc['coat']:.3f}\n" in out


def test_second_small_variant_keeps_the_v1_recipe_of_second():
    from bench.worlds import SECOND, SECOND_SMALL

    demo = WorldConfig()
    for f in (
        "arch",
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_steps",
        "tau",
        "templates",
        "seed",
        "threads",
    ):
        assert getattr(SECOND, f) == getattr(demo, f), f  # same settings, other data
    assert SECOND_SMALL.source == SECOND.source == "fashion-mnist" and SECOND_SMALL.target == SECOND.target
    assert SECOND.validation_per_class <= 60 and SECOND.heldout_per_class >= 200
