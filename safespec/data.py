"""Manifests, image banks, class-balanced samplers and data digests.

Everything a certificate rests on is data, so this module is strict: a manifest that names a missing,
unreadable or corrupt image, an unknown label or a malformed row is a one-line :class:`DataError` naming
the file and row, and nothing is ever skipped. Digests cover the manifest and the bytes of every image it
names, so the report can prove which data a verdict was computed on.

Rows in CSV manifests are numbered as an editor shows them: the header is row 1, the first record row 2.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
#: Preload a bank into one tensor when its preprocessed images fit in this many bytes.
PRELOAD_BYTES = 1 << 30
#: Decoding threads pay off only for images of real model size: 2 threads decoded 224-px JPEGs 1.9x faster
#: than one on 2 cores, but the demo's 32-px PNGs 1.4x slower (per image, Python holds the GIL longer than
#: the C decoder releases it).
THREADED_MIN_PIXELS = 96 * 96


# ------------------------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class Record:
    """One image of a manifest. ``row`` is the CSV row (header = row 1) or, for folders, the 1-based
    position in the folder listing; messages use it to point at the record."""

    path: Path
    label: int
    caption: str | None
    row: int


@dataclass(frozen=True)
class Manifest:
    source: Path
    classes: tuple[str, ...]
    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def is_folder(self) -> bool:
        return self.source.is_dir()

    @cached_property
    def labels(self) -> np.ndarray:
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self.records))

    @cached_property
    def paths(self) -> tuple[Path, ...]:
        return tuple(r.path for r in self.records)

    @cached_property
    def captions(self) -> list[str | None]:
        return [r.caption for r in self.records]

    def where(self, i: int) -> str:
        """Where record ``i`` comes from, as error messages and reports name it."""
        r = self.records[i]
        if self.is_folder:
            return f"{r.path}"
        return f"{self.source}:row {r.row}"

    def counts(self) -> dict[str, int]:
        """Images per class, in class order (classes without images included, with 0)."""
        n = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n)}

    @cached_property
    def base_dir(self) -> Path:
        """The folder that relative paths in the manifest are relative to."""
        return (self.source if self.is_folder else self.source.parent).resolve()

    def relpath(self, p: Path) -> str:
        base = str(self.base_dir)
        s = os.fspath(p)
        if s.startswith(base + os.sep):  # the common case, without building Path objects
            return s[len(base) + 1:].replace(os.sep, "/")
        try:
            return p.relative_to(self.base_dir).as_posix()
        except ValueError:
            return p.as_posix()

    @cached_property
    def file_digests(self) -> tuple[str, ...]:
        """Every image's SHA-256, in record order (read once per manifest: the digest and the overlap
        check both need them)."""
        out = tuple(file_digest(r.path) for r in self.records)
        _DIGEST_STORE.flush()
        return out

    def digest(self) -> str:
        """``sha256:`` over the classes, every record (path relative to the manifest, label, caption) and
        every image's bytes. Relative paths keep the digest stable when a data folder is moved; image
        digests are cached by (path, size, mtime), so a second digest of unchanged data is cheap."""
        h = hashlib.sha256()
        h.update(b"safespec-manifest-v1\0")
        h.update(("\0".join(self.classes) + "\0\0").encode())
        for r, d in zip(self.records, self.file_digests):
            line = f"{self.relpath(r.path)}\t{self.classes[r.label]}\t{r.caption if r.caption is not None else ''}\t"
            h.update(line.encode())
            h.update(d.encode())
            h.update(b"\n")
        return "sha256:" + h.hexdigest()


def cache_root() -> Path:
    """Where safespec keeps what it can recompute (predictions, image features, file digests)."""
    return Path(os.environ.get("SAFESPEC_CACHE_DIR", Path.home() / ".cache" / "safespec"))


class _DigestStore:
    """File digests that outlive the process, so that a second ``safespec verify`` does not hash every
    image again. An entry is valid only while the file's (size, mtime_ns, ctime_ns, inode) are unchanged:
    rewriting a file changes its ctime, which no user can set back, so a re-dated file still misses."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.entries: dict[str, list] = {}
        self.dirty = False

    def _open(self) -> None:
        path = cache_root() / "file-digests.json"
        if path != self.path:
            self.path, self.dirty = path, False
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}
            if not isinstance(self.entries, dict):  # a damaged store is a cache miss, never an error
                self.entries = {}

    def get(self, key: str, sig: list) -> str | None:
        self._open()
        e = self.entries.get(key)
        return e[-1] if isinstance(e, list) and e[:-1] == sig and isinstance(e[-1], str) else None

    def put(self, key: str, sig: list, digest: str) -> None:
        self._open()
        self.entries[key] = [*sig, digest]
        self.dirty = True

    def flush(self) -> None:
        if self.dirty and self.path is not None:
            from .errors import atomic_write_text

            try:
                atomic_write_text(self.path, json.dumps(self.entries, separators=(",", ":")))
            except OSError:
                pass  # a read-only cache only costs the next run the hashing
            self.dirty = False


_DIGEST_STORE = _DigestStore()


def decode_workers() -> int:
    """Threads for decoding images: one per core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, cached in memory and on disk by (absolute path, size, mtime_ns,
    ctime_ns, inode)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise DataError(f"{p}: cannot read file: {e.strerror or e}") from None
    key = os.fspath(p) if p.is_absolute() else str(p.resolve())  # manifest records are resolved already
    sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    entry = (key, *sig)
    d = _FILE_DIGESTS.get(entry) or _DIGEST_STORE.get(key, sig)
    if d is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        _DIGEST_STORE.put(key, sig, d)
    _FILE_DIGESTS[entry] = d
    return d


def _expected(classes: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(c) for c in classes[:limit])
    return shown + (f", ... ({len(classes)} classes)" if len(classes) > limit else "")


def _unknown_label(where: str, label: str, classes: Sequence[str], what: str = "label") -> DataError:
    close = difflib.get_close_matches(label, list(classes), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return DataError(f"{where}: unknown {what} {label!r} (expected one of {_expected(classes)}){hint}")


def read_manifest(path: str | os.PathLike, classes: Sequence[str]) -> Manifest:
    """Read a CSV manifest (``path,label[,caption]``) or an image folder (one sub-folder per class).

    Labels are class names from ``classes``; their position in ``classes`` is the integer label.
    Every named image must exist; its bytes are only read later (by :class:`ImageBank` or a digest).
    """
    src = Path(path)
    classes = tuple(classes)
    if not classes:
        raise DataError(f"{src}: no classes given to read the manifest with")
    if src.is_dir():
        return _read_folder(src, classes)
    if not src.exists():
        raise DataError(f"{src}: manifest not found (expected a CSV file or an image folder)")
    return _read_csv(src, classes)


def _read_csv(src: Path, classes: tuple[str, ...]) -> Manifest:
    index = {c: i for i, c in enumerate(classes)}
    try:
        text = src.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{src}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected a CSV manifest") from None
    except OSError as e:
        raise DataError(f"{src}: cannot read manifest: {e.strerror or e}") from None
    base = str(src.parent.resolve())
    folders: dict[str, str] = {}  # resolved once per folder, not once per image (a resolve is a syscall per component)
    rows = csv.reader(io.StringIO(text, newline=""))
    records: list[Record] = []
    header: list[str] | None = None
    try:
        for row in rows:
            n = rows.line_num
            if not row or all(not c.strip() for c in row):
                continue  # a blank line holds no record
            if header is None:
                header = [c.strip().lower() for c in row]
                if header not in (["path", "label"], ["path", "label", "caption"]):
                    raise DataError(f"{src}:row {n}: bad header {','.join(row)!r}; "
                                    "expected 'path,label' or 'path,label,caption'")
                continue
            if len(row) != len(header):
                raise DataError(f"{src}:row {n}: malformed row: {len(row)} columns, expected {len(header)} "
                                f"({','.join(header)}); quote fields that contain commas")
            rel, label = row[0].strip(), row[1].strip()
            if not rel:
                raise DataError(f"{src}:row {n}: malformed row: empty path")
            if label not in index:
                raise _unknown_label(f"{src}:row {n}", label, classes)
            full = os.path.join(base, rel)  # an absolute rel stays as it is
            resolved = _resolve_file(full, folders)
            if resolved is None:
                raise DataError(f"{src}:row {n}: image not found: {Path(full).resolve()} "
                                "(paths are relative to the manifest's folder)")
            caption = row[2].strip() if len(header) == 3 and row[2].strip() else None
            records.append(Record(resolved, index[label], caption, n))
    except csv.Error as e:
        raise DataError(f"{src}:row {rows.line_num}: malformed CSV: {e}") from None
    if header is None:
        raise DataError(f"{src}: empty manifest; expected a header 'path,label[,caption]' and one row per image")
    if not records:
        raise DataError(f"{src}: empty manifest: a header but no images")
    return Manifest(src, classes, tuple(records))


def _resolve_file(p: str, folders: dict[str, str]) -> Path | None:
    """``Path(p).resolve()`` when ``p`` is a regular file (or a link to one), else None."""
    parent, name = os.path.split(p)
    folder = folders.get(parent)
    if folder is None:
        folder = folders[parent] = os.path.realpath(parent)
    cand = os.path.join(folder, name)
    try:
        mode = os.lstat(cand).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        target = Path(cand).resolve()
        return target if target.is_file() else None
    return Path(cand) if stat.S_ISREG(mode) and name not in ("", ".", "..") else None


def _read_folder(src: Path, classes: tuple[str, ...]) -> Manifest:
    index = {c: i for i, c in enumerate(classes)}
    records: list[Record] = []
    entries = sorted(e for e in src.iterdir() if not e.name.startswith("."))
    for e in entries:
        if not e.is_dir():
            raise DataError(f"{e}: stray file in an image-folder manifest; "
                            "expected only one sub-folder per class")
        if e.name not in index:
            raise _unknown_label(f"{e}", e.name, classes, what="class folder")
    for e in sorted(entries, key=lambda d: index[d.name]):
        for f in sorted(x for x in e.iterdir() if not x.name.startswith(".")):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{f}: not an image file (expected one of "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            records.append(Record(f.resolve(), index[e.name], None, len(records) + 1))
    if not records:
        raise DataError(f"{src}: empty manifest: no images in the class folders")
    return Manifest(src, classes, tuple(records))


def write_manifest(path: str | os.PathLike, rows: Iterable[tuple[str, str, str | None]], *,
                   captions: bool = False) -> None:
    """Write a CSV manifest of ``(relative path, class name, caption)`` rows (atomic)."""
    from .errors import atomic_write_text

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "caption"] if captions else ["path", "label"])
    for rel, label, caption in rows:
        w.writerow([rel, label, caption or ""] if captions else [rel, label])
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ disjointness
def check_disjoint(manifests: Mapping[str, Manifest], pairs: Iterable[tuple[str, str]] | None = None) -> None:
    """Fail if two splits share an image, by file or by content.

    A certificate computed on images the model was trained or selected on proves nothing, and copying a
    file under a new name does not make it a new image, hence the content digest. ``pairs`` restricts the
    check to the named split pairs (default: every pair)."""
    names = list(manifests)
    todo = list(pairs) if pairs is not None else [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    by_path: dict[str, dict[Path, int]] = {}
    by_content: dict[str, dict[str, int]] = {}
    for name in {n for p in todo for n in p}:
        m = manifests[name]
        by_path[name] = {r.path: i for i, r in enumerate(m.records)}
        by_content[name] = {d: i for i, d in enumerate(m.file_digests)}
    for a, b in todo:
        ma, mb = manifests[a], manifests[b]
        same = [(i, by_path[b][r.path], "the same file") for i, r in enumerate(ma.records) if r.path in by_path[b]]
        if not same:
            same = [(by_content[a][d], j, "identical content") for d, j in by_content[b].items() if d in by_content[a]]
        if same:
            i, j, how = min(same)
            raise DataError(f"splits {a!r} and {b!r} overlap ({len(same)} image(s)), e.g. {ma.where(i)} "
                            f"({ma.records[i].path}) and {mb.where(j)} ({mb.records[j].path}) are {how}; "
                            "held-out and validation images must not be used elsewhere")


# ------------------------------------------------------------------------------------------ image banks
def load_image(manifest: Manifest, i: int) -> Image.Image:
    """Decode record ``i`` fully, as RGB (grey or palette images become 3-channel, as CLIP expects)."""
    r = manifest.records[i]
    try:
        with Image.open(r.path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        where = f"{manifest.source}:row {r.row}" if not manifest.is_folder else f"{manifest.source}"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: cannot read image {r.path}: {reason}") from None


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: Manifest, preprocess: Callable[[Image.Image], torch.Tensor]):
        self.manifest, self.preprocess = manifest, preprocess

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.manifest, i))


class ImageBank:
    """Decoded, preprocessed images of a manifest, addressable by index.

    Small data (the demo world, most protected stores of a few thousand images) is decoded once into one
    tensor, so a training step costs an index, not a decode. Large data is decoded on demand.
    ``preload=None`` picks by size. ``num_workers > 1`` decodes images of at least
    :data:`THREADED_MIN_PIXELS` with that many threads (the preload, each batch of large data, and in
    :meth:`iter_batches` the next batch while the caller uses this one)."""

    def __init__(self, manifest: Manifest, preprocess: Callable[[Image.Image], torch.Tensor], *,
                 preload: bool | None = None, num_workers: int = 0, progress: Callable[[int], Any] | None = None):
        self.manifest = manifest
        self.preprocess = preprocess
        self.num_workers = num_workers
        self._pool = None
        self._data = _ImageDataset(manifest, preprocess)
        if len(manifest) == 0:
            raise DataError(f"{manifest.source}: empty manifest: no images to load")
        first = self._data[0]
        self.item_shape = tuple(first.shape)
        self.threads = num_workers if first.shape[-1] * first.shape[-2] >= THREADED_MIN_PIXELS else 0
        if preload is None:
            preload = len(manifest) * first.numel() * first.element_size() <= PRELOAD_BYTES
        self.tensor: torch.Tensor | None = None
        if preload:
            t = torch.empty((len(manifest), *self.item_shape), dtype=first.dtype)
            t[0] = first
            rest = range(1, len(manifest))
            try:
                images = map(self._data.__getitem__, rest) if self.threads <= 1 else self._decoder().map(
                    self._data.__getitem__, rest)
                for i, img in zip(rest, images):
                    t[i] = img
                    if progress is not None:
                        progress(i)
            finally:
                self._close_pool()  # preloaded (or failed): no decoding after this
            self.tensor = t

    @property
    def preloaded(self) -> bool:
        return self.tensor is not None

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest.labels

    def __getitem__(self, idx: Any) -> torch.Tensor:
        """``bank[idx_array] -> (B, C, H, W)``; an int gives one image (C, H, W)."""
        if isinstance(idx, (int, np.integer)):
            return self.tensor[int(idx)] if self.tensor is not None else self._data[int(idx)]
        ix = torch.as_tensor(np.asarray(idx, dtype=np.int64)) if not torch.is_tensor(idx) else idx.long().cpu()
        if self.tensor is not None:
            return self.tensor.index_select(0, ix)
        if ix.numel() == 0:
            return torch.empty((0, *self.item_shape))
        rows = ix.tolist()
        if self.threads > 1 and len(rows) > 1:
            return torch.stack(list(self._decoder().map(self._data.__getitem__, rows)))
        return torch.stack([self._data[i] for i in rows])

    def _decoder(self):
        """Threads that decode images: PIL's decoders and the tensor transforms release the GIL, so threads
        use every core, and an error is re-raised in the caller as it was raised (a one-line DataError)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="safespec-decode")
        return self._pool

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(indices, images)`` over rows ``[start, stop)`` of the bank (all of it by default), in
        manifest order (a torchrun rank evaluates its own contiguous shard)."""
        n = len(self) if stop is None else min(stop, len(self))
        batches = [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(start, n, batch_size)]
        if self.tensor is not None or self.threads <= 1:
            for idx in batches:
                yield idx, self[idx]
            return
        # large data: the next batch is decoded (by the decoding threads) while the caller uses this one
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="safespec-prefetch") as ahead:
            pending = ahead.submit(self.__getitem__, batches[0]) if batches else None
            for k, idx in enumerate(batches):
                assert pending is not None  # a batch to read means one was submitted
                images = pending.result()
                if k + 1 < len(batches):
                    pending = ahead.submit(self.__getitem__, batches[k + 1])
                yield idx, images


class ViewBank:
    """A bank's images followed by ``views`` fixed augmented copies of each (store views).

    The protected store is usually the old model's own training data, which it fits far more confidently
    than images it never saw: constraints measured there barely move while held-out images flip
    (bench/RESULTS.md). A randomly shifted, rotated, rescaled or mirrored copy of a stored image is an
    image the old model did not fit, closer to what the certificate will see. The copies are fixed:
    their affine parameters are drawn once from ``seed`` (per view and image), so the old model's
    references on them are computed once and cached like any split, and a resumed run sees the same views.

    Row ``v * n + i`` is view ``v`` of image ``i`` (view 0 is the image itself). Augmentation runs on the
    preprocessed tensor (``grid_sample``, border padding), batch by batch, so nothing is stored twice."""

    #: shift as a fraction of the side, rotation in degrees, relative scale change; mirror with p = 1/2
    SHIFT, ROTATE, SCALE = 0.1, 12.0, 0.1

    def __init__(self, base: ImageBank, views: int, seed: int = 0):
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.base, self.views, self.n = base, int(views), len(base)
        self.item_shape = base.item_shape
        g = torch.Generator().manual_seed(int(seed))
        m = self.n * self.views
        u = torch.rand((5, m), generator=g, dtype=torch.float64) * 2 - 1
        ang = u[0] * np.radians(self.ROTATE)
        scale = 1 + u[1] * self.SCALE
        flip = torch.where(u[4] < 0, -1.0, 1.0).double()
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        shift = 2 * self.SHIFT  # affine_grid coordinates span [-1, 1]
        self._theta = torch.stack([torch.stack([cos * flip, -sin, u[2] * shift], 1),
                                   torch.stack([sin * flip, cos, u[3] * shift], 1)], 1).float()

    def __len__(self) -> int:
        return self.n * (1 + self.views)

    @property
    def labels(self) -> np.ndarray:
        return np.tile(self.base.labels, 1 + self.views)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([int(idx)])][0]
        ix = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        images = self.base[ix % self.n]
        aug = ix >= self.n
        if aug.any():
            import torch.nn.functional as F

            sel = torch.as_tensor(np.flatnonzero(aug))
            x = images.index_select(0, sel)
            theta = self._theta.index_select(0, torch.as_tensor(ix[aug] - self.n))
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            images = images.clone()
            images[sel] = F.grid_sample(x.float(), grid, padding_mode="border", align_corners=False).to(images.dtype)
        return images

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        n = len(self) if stop is None else min(stop, len(self))
        for s in range(start, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n), dtype=np.int64)
            yield idx, self[idx]

    def digest(self, base_digest: str) -> str:
        """The views' digest: the base split's, the view count, the seed's draw and the augmentation."""
        h = hashlib.sha256(base_digest.encode())
        h.update(json.dumps({"views": self.views, "shift": self.SHIFT, "rotate": self.ROTATE,
                             "scale": self.SCALE}).encode())
        h.update(self._theta.numpy().tobytes())
        return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------------ samplers
class _Cycle:
    """Walks a pool of indices in random permutations, one full pass before any repeat.

    Every stored image gets used; when a permutation runs out in the middle of a draw, the images already
    drawn in that draw go to the end of the next permutation so that one draw has no duplicates whenever
    the pool is large enough."""

    def __init__(self, pool: np.ndarray):
        self.pool = np.asarray(pool, dtype=np.int64)
        self.perm = np.empty(0, dtype=np.int64)
        self.cursor = 0

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out: list[np.ndarray] = []
        need = n
        while need > 0:
            if self.cursor >= len(self.perm):
                perm = rng.permutation(self.pool)
                if out:
                    taken = np.isin(perm, np.concatenate(out))
                    perm = np.concatenate([perm[~taken], perm[taken]])
                self.perm, self.cursor = perm, 0
            k = min(need, len(self.perm) - self.cursor)
            out.append(self.perm[self.cursor:self.cursor + k])
            self.cursor += k
            need -= k
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def state(self) -> dict:
        return {"size": len(self.pool), "perm": self.perm.tolist(), "cursor": int(self.cursor)}

    def load(self, st: Mapping[str, Any], what: str) -> None:
        perm = np.asarray(st["perm"], dtype=np.int64)
        if int(st["size"]) != len(self.pool) or (len(perm) and not np.array_equal(np.sort(perm), self.pool)):
            raise DataError(f"sampler state does not match the data ({what}: the state was written for "
                            f"{int(st['size'])} images, the data has {len(self.pool)}); resume with the same data")
        self.perm, self.cursor = perm, int(st["cursor"])


def _rng_state(rng: np.random.Generator) -> dict:
    return dict(rng.bit_generator.state)


def _check_rng_state(st: Any) -> dict:
    if not isinstance(st, Mapping) or st.get("bit_generator") != "PCG64":
        raise DataError("sampler state is not a PCG64 generator state; resume with a state written by safespec")
    return dict(st)


class ProtectedSampler:
    """Class-balanced protected batches: ``classes_per_step`` classes drawn at random each step (without
    replacement), ``per_class`` images of each. The per-step cost is fixed however many classes are
    protected (364 on Places365), and cycling through a per-class permutation uses every stored image."""

    def __init__(self, labels: np.ndarray, class_ids: Sequence[int], classes_per_step: int, per_class: int,
                 seed: int = 0, *, class_names: Sequence[str] | None = None):
        labels = np.asarray(labels, dtype=np.int64)
        self.class_ids = np.asarray(sorted(set(int(c) for c in class_ids)), dtype=np.int64)
        if len(self.class_ids) == 0:
            raise DataError("protected sampler: no protected classes")
        if classes_per_step < 1 or per_class < 1:
            raise DataError(f"protected sampler: classes_per_step ({classes_per_step}) and per_class "
                            f"({per_class}) must be at least 1")
        self.k = min(int(classes_per_step), len(self.class_ids))
        self.n = int(per_class)
        self.cycles: dict[int, _Cycle] = {}
        for c in self.class_ids:
            pool = np.flatnonzero(labels == c)
            if len(pool) == 0:
                name = class_names[c] if class_names is not None else f"class {c}"
                raise DataError(f"protected store: no images of protected class {name!r}; "
                                "every protected class needs stored images")
            self.cycles[int(c)] = _Cycle(pool)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, drawn_classes)``; ``indices[j*n:(j+1)*n]`` are images of ``drawn_classes[j]``."""
        drawn = self.rng.choice(self.class_ids, size=self.k, replace=False)
        idx = np.concatenate([self.cycles[int(c)].take(self.n, self.rng) for c in drawn])
        return idx, drawn.astype(np.int64)

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "classes": {str(c): cy.state() for c, cy in self.cycles.items()}}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        if set(st["classes"]) != {str(c) for c in self.cycles}:
            raise DataError("sampler state does not match the data: it was written for other protected classes")
        for c, cy in self.cycles.items():
            cy.load(st["classes"][str(c)], f"class {c}")
        self.rng.bit_generator.state = _check_rng_state(st["rng"])


class TargetSampler:
    """Target batches with a fixed share of target-class positives; the rest are negatives."""

    def __init__(self, labels: np.ndarray, target_index: int, batch_size: int, positive_fraction: float,
                 seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if not 0.0 < positive_fraction <= 1.0:
            raise DataError(f"target sampler: positive_fraction {positive_fraction} must be in (0, 1]")
        self.n_pos = max(1, round(batch_size * positive_fraction))
        self.n_neg = max(0, int(batch_size) - self.n_pos)
        pos, neg = np.flatnonzero(labels == target_index), np.flatnonzero(labels != target_index)
        if len(pos) == 0:
            raise DataError("target data: no images of the target class; the target split needs positives")
        if self.n_neg and len(neg) == 0:
            raise DataError("target data: no negatives (images of other classes); the target split needs both")
        self.pos, self.neg = _Cycle(pos), _Cycle(neg)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(positive indices, negative indices)`` into the target split."""
        pos = self.pos.take(self.n_pos, self.rng)
        neg = self.neg.take(self.n_neg, self.rng) if self.n_neg else np.empty(0, dtype=np.int64)
        return pos, neg

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "pos": self.pos.state(), "neg": self.neg.state()}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        self.pos.load(st["pos"], "target positives")
        self.neg.load(st["neg"], "target negatives")
        self.rng.bit_generator.state = _check_rng_state(st["rng"])
