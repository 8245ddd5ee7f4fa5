"""Manifests, banks, samplers, digests and split disjointness."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safespec.data import (
    ImageBank,
    ViewBank,
    ProtectedSampler,
    TargetSampler,
    check_disjoint,
    file_digest,
    read_manifest,
    write_manifest,
)
from safespec.data import digests as digests_mod
from safespec.data import manifests as manifests_mod
from safespec.errors import DataError, SafespecError

CLASSES = ("cat", "dog", "cow")


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


def make_image(path: Path, value: int, size=(6, 5), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    arr[0, 0] = (value * 7 + 1) % 256  # distinct content per value
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def csv_data(tmp_path: Path) -> Path:
    """A CSV manifest with a sub-folder of images and captions."""
    rows = []
    for i, c in enumerate(["cat", "dog", "cow", "dog", "cat"]):
        make_image(tmp_path / "img" / f"{i}.png", 10 * i + 5)
        rows.append((f"img/{i}.png", c, f"a photo of a {c}." if i % 2 == 0 else None))
    write_manifest(tmp_path / "m.csv", rows, captions=True)
    return tmp_path / "m.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ parsing
def test_csv_manifest_paths_labels_captions(csv_data: Path):
    m = read_manifest(csv_data, CLASSES)
    assert len(m) == 5
    assert m.labels.dtype == np.int64
    assert m.labels.tolist() == [0, 1, 2, 1, 0]
    assert m.paths[2] == (csv_data.parent / "img" / "2.png").resolve()
    assert m.captions == ["a photo of a cat.", None, "a photo of a cow.", None, "a photo of a cat."]
    assert [r.row for r in m.records] == [2, 3, 4, 5, 6]  # header is row 1
    assert m.counts() == {"cat": 2, "dog": 2, "cow": 1}


def test_csv_without_caption_column_and_relative_to_manifest(tmp_path: Path):
    make_image(tmp_path / "a" / "x.png", 3)
    sub = tmp_path / "lists"
    sub.mkdir()
    m = read_manifest(write(sub / "m.csv", "path,label\n../a/x.png,cow\n\n"), CLASSES)
    assert m.records[0].caption is None and m.records[0].label == 2
    assert m.records[0].path == (tmp_path / "a" / "x.png").resolve()


def test_folder_manifest(tmp_path: Path):
    make_image(tmp_path / "data" / "dog" / "b.png", 1)
    make_image(tmp_path / "data" / "dog" / "a.png", 2)
    make_image(tmp_path / "data" / "cat" / "z.jpg", 3, mode="RGB")
    (tmp_path / "data" / "cat" / ".DS_Store").write_bytes(b"x")  # hidden files are not data
    m = read_manifest(tmp_path / "data", CLASSES)
    assert m.labels.tolist() == [0, 1, 1]  # class order, then file name
    assert [p.name for p in m.paths] == ["z.jpg", "a.png", "b.png"]
    assert m.captions == [None, None, None]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "path,label\nimg/0.png,horse\n",
            r"m\.csv:row 2: unknown label 'horse' \(expected one of 'cat', 'dog', 'cow'\)",
        ),
        ("path,label\nimg/0.png,dgo\n", r"m\.csv:row 2: unknown label 'dgo'.*did you mean 'dog'\?"),
        ("path,label\nimg/0.png,cat\nimg/0.png,cat,extra\n", r"m\.csv:row 3: malformed row: 3 columns, expected 2"),
        ("path,label\nimg/0.png\n", r"m\.csv:row 2: malformed row: 1 columns, expected 2"),
        ("path,label\n,cat\n", r"m\.csv:row 2: malformed row: empty path"),
        ("file,class\nimg/0.png,cat\n", r"m\.csv:row 1: bad header 'file,class'"),
        ("", r"m\.csv: empty manifest"),
        ("path,label\n", r"m\.csv: empty manifest: a header but no images"),
    ],
)
def test_csv_errors_name_file_and_row(tmp_path: Path, text: str, message: str):
    make_image(tmp_path / "img" / "0.png", 1)
    with pytest.raises(DataError, match=message) as e:
        read_manifest(write(tmp_path / "m.csv", text), CLASSES)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, SafespecError)


def test_missing_image_names_row_and_resolved_path(tmp_path: Path):
    make_image(tmp_path / "img" / "0.png", 1)
    m = write(tmp_path / "m.csv", "path,label\nimg/0.png,cat\nimg/nope.png,dog\n")
    with pytest.raises(DataError) as e:
        read_manifest(m, CLASSES)
    assert str(e.value).startswith(f"{m}:row 3: image not found: {(tmp_path / 'img' / 'nope.png').resolve()}")


def test_missing_manifest_and_bad_folders(tmp_path: Path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv", CLASSES)
    make_image(tmp_path / "d" / "horse" / "a.png", 1)
    with pytest.raises(DataError, match=r"horse: unknown class folder 'horse'"):
        read_manifest(tmp_path / "d", CLASSES)
    (tmp_path / "e" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="empty manifest"):
        read_manifest(tmp_path / "e", CLASSES)
    (tmp_path / "e" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        read_manifest(tmp_path / "e", CLASSES)


# ------------------------------------------------------------------------------------------ banks
@pytest.mark.parametrize("preload", [True, False])
def test_image_bank_indexing_and_batches(csv_data: Path, preload: bool):
    m = read_manifest(csv_data, CLASSES)
    bank = ImageBank(m, to_tensor, preload=preload)
    assert bank.preloaded is preload and len(bank) == 5
    x = bank[np.array([4, 0, 2])]
    assert x.shape == (3, 3, 5, 6)  # grey PNGs come out as 3 channels
    assert torch.allclose(x[1, :, 1, 1], torch.full((3,), 5 / 255.0))
    assert torch.allclose(x[0, :, 1, 1], torch.full((3,), 45 / 255.0))
    seen = []
    for idx, batch in bank.iter_batches(2):
        assert torch.equal(batch, bank[idx])
        seen.extend(idx.tolist())
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("preload", [True, False])
def test_store_views_are_fixed_augmented_copies(tmp_path: Path, preload: bool):
    """View 0 is the image itself; the other views are augmented copies, the same on every read and for the
    same seed, with the base image's label; the digest names the views."""
    rng = np.random.default_rng(0)
    rows = []
    for i, c in enumerate(["cat", "dog", "cow", "dog"]):
        arr = (rng.random((16, 16)) * 255).astype(np.uint8)
        (tmp_path / "v").mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "v" / f"{i}.png")
        rows.append((f"v/{i}.png", c, None))
    write_manifest(tmp_path / "m.csv", rows)
    bank = ImageBank(read_manifest(tmp_path / "m.csv", CLASSES), to_tensor, preload=preload)
    views = ViewBank(bank, 2, seed=3)
    assert len(views) == 12 and views.labels.tolist() == bank.labels.tolist() * 3
    x = views[np.arange(12)]
    assert torch.equal(x[:4], bank[np.arange(4)])
    for v in (1, 2):  # every augmented copy differs from its image, and the two views differ
        assert all(not torch.allclose(x[v * 4 + i], x[i], atol=1e-3) for i in range(4))
    assert not torch.allclose(x[4:8], x[8:12])
    assert torch.equal(views[np.array([9, 5])], x[[9, 5]]) and torch.equal(views[7], x[7])
    assert torch.equal(ViewBank(bank, 2, seed=3)[np.arange(12)], x)  # fixed: the same copies every time
    assert not torch.allclose(ViewBank(bank, 2, seed=4)[np.arange(4, 12)], x[4:])
    assert [i.tolist() for i, _ in views.iter_batches(5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    d = views.digest("sha256:base")
    assert d != ViewBank(bank, 2, seed=4).digest("sha256:base") != ViewBank(bank, 1, seed=3).digest("sha256:base")
    assert d == ViewBank(bank, 2, seed=3).digest("sha256:base") != views.digest("sha256:other")


@pytest.mark.parametrize("preload", [False, True])
def test_image_bank_decoding_threads_give_the_same_images(csv_data: Path, preload: bool, monkeypatch):
    monkeypatch.setattr("safespec.data.images.THREADED_MIN_PIXELS", 0)  # the test images are tiny
    bank = ImageBank(read_manifest(csv_data, CLASSES), to_tensor, preload=preload, num_workers=3)
    ref = ImageBank(read_manifest(csv_data, CLASSES), to_tensor, preload=True)
    got = torch.cat([b for _, b in bank.iter_batches(2)])  # the next batch is decoded ahead
    assert torch.equal(got, ref.tensor)
    assert torch.equal(bank[[4, 0, 2]], ref.tensor[[4, 0, 2]])
    assert [i.tolist() for i, _ in bank.iter_batches(2, 1, 4)] == [[1, 2], [3]]
    assert bank.threads == 3


def test_small_images_decode_without_threads(csv_data: Path):
    assert ImageBank(read_manifest(csv_data, CLASSES), to_tensor, num_workers=3).threads == 0


@pytest.mark.parametrize("preload", [True, False])
@pytest.mark.parametrize("workers", [0, 3])
def test_corrupt_image_names_manifest_row_and_image(csv_data: Path, preload: bool, workers: int, monkeypatch):
    monkeypatch.setattr("safespec.data.images.THREADED_MIN_PIXELS", 0)
    bad = csv_data.parent / "img" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    m = read_manifest(csv_data, CLASSES)
    with pytest.raises(DataError) as e:
        bank = ImageBank(m, to_tensor, preload=preload, num_workers=workers)
        bank[np.arange(5)]
    msg = str(e.value)
    assert msg.startswith(f"{csv_data}:row 5: cannot read image {bad.resolve()}")
    assert "\n" not in msg


def test_a_bank_of_decoded_images_decodes_nothing(csv_data: Path, monkeypatch):
    ref = ImageBank(read_manifest(csv_data, CLASSES), to_tensor, preload=True)
    m = read_manifest(csv_data, CLASSES)
    monkeypatch.setattr("safespec.data.images.load_image", lambda *a: pytest.fail("decoded an image"))
    bank = ImageBank(m, to_tensor, images=ref.tensor)
    assert bank.preloaded and torch.equal(torch.cat([b for _, b in bank.iter_batches(2)]), ref.tensor)
    with pytest.raises(DataError, match="decoded images for a manifest of 5"):
        ImageBank(m, to_tensor, images=ref.tensor[:3])


def test_preload_default_picks_small_data(csv_data: Path):
    assert ImageBank(read_manifest(csv_data, CLASSES), to_tensor).preloaded


# ------------------------------------------------------------------------------------------ digests
def test_digest_changes_with_any_image_byte_and_is_stable_otherwise(csv_data: Path):
    d0 = read_manifest(csv_data, CLASSES).digest()
    assert d0.startswith("sha256:") and len(d0) == 7 + 64
    assert read_manifest(csv_data, CLASSES).digest() == d0
    img = csv_data.parent / "img" / "2.png"
    data = bytearray(img.read_bytes())
    data[-5] ^= 0xFF  # inside the IEND chunk's CRC: same size, different bytes
    st = img.stat()
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert read_manifest(csv_data, CLASSES).digest() != d0


def test_digest_covers_labels_and_survives_moving_the_folder(csv_data: Path, tmp_path: Path):
    d0 = read_manifest(csv_data, CLASSES).digest()
    text = csv_data.read_text()
    write(csv_data, text.replace("img/1.png,dog", "img/1.png,cow"))
    assert read_manifest(csv_data, CLASSES).digest() != d0
    write(csv_data, text)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    assert read_manifest(moved / "m.csv", CLASSES).digest() == d0


# ------------------------------------------------------------------------------------------ disjointness
def test_check_disjoint_same_file_and_same_content(tmp_path: Path):
    for i in range(3):
        make_image(tmp_path / "a" / f"{i}.png", i)
        make_image(tmp_path / "b" / f"{i}.png", 100 + i)
    a = read_manifest(write(tmp_path / "a.csv", "path,label\na/0.png,cat\na/1.png,dog\n"), CLASSES)
    b = read_manifest(write(tmp_path / "b.csv", "path,label\nb/0.png,cat\nb/1.png,dog\n"), CLASSES)
    check_disjoint({"train": a, "heldout": b})
    c = read_manifest(write(tmp_path / "c.csv", "path,label\nb/2.png,cat\na/1.png,dog\n"), CLASSES)
    with pytest.raises(
        DataError,
        match=r"splits 'train' and 'heldout' overlap \(1 image\(s\)\).*a\.csv:row 3.*"
        r"c\.csv:row 3.*the same file",
    ):
        check_disjoint({"train": a, "heldout": c})
    # a byte-identical copy under another name is the same image
    (tmp_path / "b" / "copy.png").write_bytes((tmp_path / "a" / "0.png").read_bytes())
    d = read_manifest(write(tmp_path / "d.csv", "path,label\nb/2.png,cat\nb/copy.png,cat\n"), CLASSES)
    with pytest.raises(DataError, match=r"splits 'train' and 'validation'.*identical content"):
        check_disjoint({"train": a, "validation": d})
    # only the named pairs are checked
    check_disjoint({"train": a, "heldout": b, "validation": d}, pairs=[("train", "heldout")])


# ------------------------------------------------------------------------------------------ samplers
def protected_labels() -> np.ndarray:
    # classes 0..5 with 7, 3, 12, 1, 9, 20 images (class 3 is tiny); class 6 is unprotected
    sizes = [7, 3, 12, 1, 9, 20, 5]
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    return np.random.default_rng(1).permutation(labels)


def test_protected_sampler_balance_and_no_duplicates():
    labels = protected_labels()
    s = ProtectedSampler(labels, [0, 1, 2, 4, 5], classes_per_step=3, per_class=3, seed=7)
    counts = np.zeros(7, int)
    used: dict[int, set] = {c: set() for c in range(7)}
    for _ in range(200):
        idx, drawn = s.sample()
        assert len(drawn) == 3 and len(set(drawn.tolist())) == 3
        assert set(drawn.tolist()) <= {0, 1, 2, 4, 5}
        assert len(idx) == 9
        for j, c in enumerate(drawn):
            block = idx[3 * j : 3 * j + 3]
            assert (labels[block] == c).all()
            assert len(set(block.tolist())) == 3  # no duplicates within a class in one step
            used[int(c)].update(block.tolist())
            counts[c] += 1
    # every class drawn roughly equally often (each with prob 3/5 per step), and every image used
    assert counts[[0, 1, 2, 4, 5]].min() > 90 and counts[[3, 6]].sum() == 0
    for c in [0, 1, 2, 4, 5]:
        assert used[c] == set(np.flatnonzero(labels == c).tolist())


def test_protected_sampler_uses_each_image_once_per_cycle():
    labels = np.repeat(np.arange(2), 12)
    s = ProtectedSampler(labels, [0, 1], classes_per_step=2, per_class=4, seed=0)
    got = {0: [], 1: []}
    for _ in range(3):  # 3 steps x 4 = 12 = one full pass per class
        idx, drawn = s.sample()
        for j, c in enumerate(drawn):
            got[int(c)].extend(idx[4 * j : 4 * j + 4].tolist())
    for c in (0, 1):
        assert sorted(got[c]) == list(range(12 * c, 12 * c + 12))


def test_protected_sampler_tiny_class_repeats_only_when_it_must():
    labels = protected_labels()
    s = ProtectedSampler(labels, [3], classes_per_step=5, per_class=4, seed=0)
    idx, drawn = s.sample()
    assert drawn.tolist() == [3] and len(idx) == 4 and set(idx.tolist()) == set(np.flatnonzero(labels == 3))


def test_samplers_are_deterministic_given_the_seed():
    labels = protected_labels()
    a = ProtectedSampler(labels, range(6), 2, 3, seed=3)
    b = ProtectedSampler(labels, range(6), 2, 3, seed=3)
    c = ProtectedSampler(labels, range(6), 2, 3, seed=4)
    sa = [a.sample() for _ in range(20)]
    sb = [b.sample() for _ in range(20)]
    sc = [c.sample() for _ in range(20)]
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(sa, sb))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(sa, sc))


def test_protected_sampler_state_round_trip_continues_the_sequence():
    labels = protected_labels()
    a = ProtectedSampler(labels, range(6), 2, 4, seed=11)
    for _ in range(7):
        a.sample()
    st = json.loads(json.dumps(a.state_dict()))  # what a resume checkpoint stores
    expected = [a.sample() for _ in range(25)]
    b = ProtectedSampler(labels, range(6), 2, 4, seed=999)
    b.load_state_dict(st)
    got = [b.sample() for _ in range(25)]
    for (ei, ed), (gi, gd) in zip(expected, got):
        assert np.array_equal(ei, gi) and np.array_equal(ed, gd)


def test_protected_sampler_state_of_other_data_is_refused():
    labels = protected_labels()
    a = ProtectedSampler(labels, range(6), 2, 4, seed=1)
    a.sample()
    b = ProtectedSampler(labels, range(5), 2, 4, seed=1)
    with pytest.raises(DataError, match="other protected classes"):
        b.load_state_dict(a.state_dict())
    c = ProtectedSampler(np.concatenate([labels, [0, 0]]), range(6), 2, 4, seed=1)
    st = a.state_dict()
    with pytest.raises(DataError, match="resume with the same data"):
        c.load_state_dict(st)


def test_protected_sampler_class_without_images_is_an_error():
    with pytest.raises(DataError, match="no images of protected class 'cow'"):
        ProtectedSampler(np.array([0, 0, 1]), [0, 2], 2, 2, class_names=CLASSES)


def test_target_sampler_fraction_determinism_and_resume():
    labels = np.array([1] * 10 + [0] * 30 + [2] * 25)
    s = TargetSampler(labels, target_index=1, batch_size=16, positive_fraction=0.5, seed=5)
    pos, neg = s.sample()
    assert len(pos) == 8 and len(neg) == 8
    assert (labels[pos] == 1).all() and (labels[neg] != 1).all()
    assert len(set(pos.tolist())) == 8 and len(set(neg.tolist())) == 8
    for _ in range(3):
        s.sample()
    st = json.loads(json.dumps(s.state_dict()))
    expected = [s.sample() for _ in range(10)]
    t = TargetSampler(labels, 1, 16, 0.5, seed=0)
    t.load_state_dict(st)
    for (ep, en), (gp, gn) in zip(expected, [t.sample() for _ in range(10)]):
        assert np.array_equal(ep, gp) and np.array_equal(en, gn)
    u = TargetSampler(labels, 1, 16, 0.5, seed=5)
    v = TargetSampler(labels, 1, 16, 0.5, seed=5)
    assert all(np.array_equal(u.sample()[1], v.sample()[1]) for _ in range(5))


def test_target_sampler_needs_positives_and_negatives():
    with pytest.raises(DataError, match="no images of the target class"):
        TargetSampler(np.array([0, 2, 2]), 1, 8, 0.5)
    with pytest.raises(DataError, match="no negatives"):
        TargetSampler(np.array([1, 1, 1]), 1, 8, 0.5)


def test_file_digest_is_cached_by_size_and_mtime(tmp_path: Path):
    p = make_image(tmp_path / "a.png", 9)
    d = file_digest(p)
    assert d == file_digest(p)
    import hashlib

    assert d == hashlib.sha256(p.read_bytes()).hexdigest()


def test_file_digests_persist_across_processes_until_the_file_changes(tmp_path, monkeypatch):
    from safespec.data import digests as data_mod

    monkeypatch.setenv("SAFESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_DIGEST_STORE", data_mod._DigestStore())
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    legacy = tmp_path / "cache" / data_mod.LEGACY_STORE  # an earlier version's single store
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({str(f): [3, 0, 0, 0, "stale"]}))
    real = data_mod.file_digest(f)
    assert legacy.exists()  # nothing flushed yet: nothing removed
    data_mod._DIGEST_STORE.flush()
    assert not legacy.exists()  # read by nothing now, so it goes once the per-folder store is written
    store = data_mod._DIGEST_STORE.path_of(str(tmp_path))
    assert store.parent == tmp_path / "cache" / "file-digests"  # one small file per folder of hashed files
    entries = json.loads(store.read_text())
    assert entries[str(f)][-1] == real
    # a new process (empty memory) takes the stored digest: prove it by planting a marker there
    entries[str(f)][-1] = "planted"
    store.write_text(json.dumps(entries))
    monkeypatch.setattr(data_mod, "_FILE_DIGESTS", {})
    monkeypatch.setattr(data_mod, "_DIGEST_STORE", data_mod._DigestStore())
    assert data_mod.file_digest(f) == "planted"
    # rewriting the file with the same size and setting its mtime back still misses (its ctime moved)
    st = f.stat()
    f.write_bytes(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert data_mod.file_digest(f) == hashlib.sha256(b"two").hexdigest()


def test_the_digest_store_keeps_one_small_file_per_folder(tmp_path, monkeypatch):
    """A process reads and rewrites only the folders it hashes: hashing a new image in one world's folder
    does not rewrite the digests of every other world's images."""
    from safespec.data import digests as data_mod

    monkeypatch.setenv("SAFESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_DIGEST_STORE", data_mod._DigestStore())
    monkeypatch.setattr(data_mod, "_FILE_DIGESTS", {})
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.bin").write_bytes(folder.encode())
        data_mod.file_digest(tmp_path / folder / "x.bin")
    data_mod._DIGEST_STORE.flush()
    shard_a = data_mod._DIGEST_STORE.path_of(str(tmp_path / "a"))
    shard_b = data_mod._DIGEST_STORE.path_of(str(tmp_path / "b"))
    assert shard_a != shard_b
    assert list(json.loads(shard_a.read_text())) == [str(tmp_path / "a" / "x.bin")]
    b_before = shard_b.stat().st_ino
    (tmp_path / "a" / "y.bin").write_bytes(b"y")
    data_mod.file_digest(tmp_path / "a" / "y.bin")
    data_mod._DIGEST_STORE.flush()
    assert len(json.loads(shard_a.read_text())) == 2
    assert shard_b.stat().st_ino == b_before  # not rewritten (an atomic rewrite is a new inode)


def test_manifest_paths_through_a_symlink_resolve_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "img" / "x.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "img" / "x.png")
    (tmp_path / "m.csv").write_text("path,label\nlink.png,cat\nimg/../img/x.png,dog\n")
    m = read_manifest(tmp_path / "m.csv", ["cat", "dog"])
    assert [r.path for r in m.records] == [(tmp_path / "img" / "x.png").resolve()] * 2


@pytest.mark.parametrize("content", ["[1, 2]", '{"x": 3}', "not json", '{"PATH": 7}', '{"PATH": [1, 2]}'])
def test_a_damaged_digest_store_is_a_cache_miss(tmp_path, monkeypatch, content):
    from safespec.data import digests as data_mod

    monkeypatch.setenv("SAFESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_DIGEST_STORE", data_mod._DigestStore())
    monkeypatch.setattr(data_mod, "_FILE_DIGESTS", {})
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    store = data_mod._DIGEST_STORE.path_of(str(tmp_path))
    store.parent.mkdir(parents=True)
    store.write_text(content.replace("PATH", json.dumps(str(f))[1:-1]))
    assert data_mod.file_digest(f) == hashlib.sha256(b"one").hexdigest()


# ------------------------------------------------------------------------------------------ re-reading
@pytest.fixture
def settled(monkeypatch):
    """Files written before a read count as settled (the racy window is a wait the suite cannot afford);
    a file written during a check is still racy."""
    monkeypatch.setattr(digests_mod, "RACY_SECONDS", 0.0)
    time.sleep(0.02)  # past the file system's timestamp tick


def test_an_unchanged_manifest_is_read_once_per_process(csv_data: Path, monkeypatch, settled):
    first = read_manifest(csv_data, CLASSES)
    digest = first.digest()
    reads = []
    monkeypatch.setattr(manifests_mod, "_read_csv", lambda *a, **k: reads.append(a) or pytest.fail("read again"))
    again = read_manifest(csv_data, CLASSES)
    assert again is first and again.digest() == digest and not reads


@pytest.mark.parametrize("change", ["image bytes", "image removed", "manifest row", "folder re-pointed", "classes"])
def test_a_changed_manifest_is_read_again(tmp_path: Path, change: str, monkeypatch):
    for i in range(3):
        make_image(tmp_path / "a" / f"{i}.png", i)
        make_image(tmp_path / "b" / f"{i}.png", 100 + i)
    (tmp_path / "data").symlink_to(tmp_path / "a")
    src = write(tmp_path / "m.csv", "path,label\ndata/0.png,cat\ndata/1.png,dog\n")
    monkeypatch.setattr(digests_mod, "RACY_SECONDS", 0.0)
    time.sleep(0.02)
    first = read_manifest(src, CLASSES)
    assert read_manifest(src, CLASSES) is first  # remembered, until the change below
    d0 = first.digest()
    classes = CLASSES
    if change == "image bytes":  # same size, and the old timestamps put back: only the inode's ctime moves
        img = tmp_path / "a" / "1.png"
        st = img.stat()
        data = bytearray(img.read_bytes())
        data[-5] ^= 0xFF
        img.write_bytes(bytes(data))
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "image removed":
        (tmp_path / "a" / "1.png").unlink()
        with pytest.raises(DataError, match=r"m\.csv:row 3: image not found"):
            read_manifest(src, CLASSES)
        return
    elif change == "manifest row":  # same length, same second
        src.write_text(src.read_text().replace("1.png,dog", "1.png,cow"))
    elif change == "folder re-pointed":
        (tmp_path / "data").unlink()
        (tmp_path / "data").symlink_to(tmp_path / "b")
    else:
        classes = list(reversed(CLASSES))
    again = read_manifest(src, classes)
    assert again is not first and again.digest() != d0


def test_a_just_written_image_is_never_trusted_by_its_timestamps(csv_data: Path, monkeypatch):
    first = read_manifest(csv_data, CLASSES)  # images written a moment ago: inside the racy window
    assert read_manifest(csv_data, CLASSES) is not first


def test_disjointness_is_checked_again_for_other_manifests(tmp_path: Path):
    for i in range(2):
        make_image(tmp_path / "a" / f"{i}.png", i)
    a = read_manifest(write(tmp_path / "a.csv", "path,label\na/0.png,cat\n"), CLASSES)
    b = read_manifest(write(tmp_path / "b.csv", "path,label\na/1.png,cat\n"), CLASSES)
    check_disjoint({"x": a, "y": b})
    check_disjoint({"x": a, "y": b})  # remembered
    c = read_manifest(write(tmp_path / "c.csv", "path,label\na/1.png,dog\na/0.png,cat\n"), CLASSES)
    with pytest.raises(DataError, match="overlap"):
        check_disjoint({"x": a, "y": c})
    with pytest.raises(DataError, match="overlap"):  # an overlap is never remembered as disjoint
        check_disjoint({"x": a, "y": c})
