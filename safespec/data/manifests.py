"""Manifests: a split as rows of (image path, label[, caption]) from a CSV file or a folder per class,
with one located line (file and row) per problem, and the check that splits share no image."""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import DataError, atomic_write_text
from . import digests
from .digests import _DIGEST_STORE, file_digest

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


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
            return s[len(base) + 1 :].replace(os.sep, "/")
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
        return self._digest

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(b"safespec-manifest-v1\0")
        h.update(("\0".join(self.classes) + "\0\0").encode())
        for r, d in zip(self.records, self.file_digests):
            line = f"{self.relpath(r.path)}\t{self.classes[r.label]}\t{r.caption if r.caption is not None else ''}\t"
            h.update(line.encode())
            h.update(d.encode())
            h.update(b"\n")
        return "sha256:" + h.hexdigest()


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
    return _read_csv_memo(src, classes)


@dataclass(frozen=True)
class _Checked:
    """A CSV manifest as it was read, and what must be unchanged for it to be that manifest still: the
    CSV file itself, every folder its rows name (resolved), and every image file (never a link)."""

    key: tuple
    manifest: Manifest
    folders: tuple[tuple[str, str], ...]  # (folder as the rows name it, its real path)
    files: tuple[tuple[str, tuple[int, int, int, int]], ...]  # (image path, (size, mtime, ctime, inode))

    def still_valid(self) -> bool:
        if any(os.path.realpath(f) != real for f, real in self.folders):
            return False
        for path, sig in self.files:
            try:
                st = os.lstat(path)
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != sig or not stat.S_ISREG(st.st_mode):
                return False
        return True


#: Manifests read in this process, by file. A release pipeline (or the bench) that verifies several
#: candidates against one spec reads the same four manifests each time; a manifest whose file, folders and
#: images are all unchanged (every image's size, mtime, ctime and inode, as the digest cache keys them) is
#: the one read before, with its image digests, digest and disjointness already checked.
_CHECKED: dict[str, _Checked] = {}


def _read_csv_memo(src: Path, classes: tuple[str, ...]) -> Manifest:
    path = os.path.abspath(src)
    try:
        # the CSV's own bytes, not its timestamps: a rewrite within one timestamp tick is still seen
        key = (hashlib.sha256(src.read_bytes()).hexdigest(), classes)
    except OSError:
        return _read_csv(src, classes)  # which says what is wrong with the file
    seen = _CHECKED.get(path)
    if seen is not None and seen.key == key and seen.still_valid():
        return seen.manifest
    _CHECKED.pop(path, None)
    folders: dict[str, tuple[str, Path]] = {}
    checked_at = time.time_ns()
    m = _read_csv(src, classes, folders)
    files = []
    racy = checked_at - int(digests.RACY_SECONDS * 1e9)  # a manifest with an image just written: not kept
    for r in m.records:
        p = os.fspath(r.path)
        st = os.lstat(p)
        # a link among the rows, or an image just written: read the manifest afresh next time
        if not stat.S_ISREG(st.st_mode) or max(st.st_mtime_ns, st.st_ctime_ns) >= racy:
            return m
        files.append((p, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
    _CHECKED[path] = _Checked(key, m, tuple((f, real) for f, (real, _) in folders.items()), tuple(files))
    return m


def _read_csv(src: Path, classes: tuple[str, ...], folders: dict[str, tuple[str, Path]] | None = None) -> Manifest:
    index = {c: i for i, c in enumerate(classes)}
    try:
        text = src.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{src}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected a CSV manifest"
        ) from None
    except OSError as e:
        raise DataError(f"{src}: cannot read manifest: {e.strerror or e}") from None
    base = str(src.parent.resolve())
    # resolved once per folder, not once per image (a resolve is a syscall per component)
    folders = {} if folders is None else folders
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
                    raise DataError(
                        f"{src}:row {n}: bad header {','.join(row)!r}; expected 'path,label' or 'path,label,caption'"
                    )
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{src}:row {n}: malformed row: {len(row)} columns, expected {len(header)} "
                    f"({','.join(header)}); quote fields that contain commas"
                )
            rel, label = row[0].strip(), row[1].strip()
            if not rel:
                raise DataError(f"{src}:row {n}: malformed row: empty path")
            if label not in index:
                raise _unknown_label(f"{src}:row {n}", label, classes)
            full = os.path.join(base, rel)  # an absolute rel stays as it is
            resolved = _resolve_file(full, folders)
            if resolved is None:
                raise DataError(
                    f"{src}:row {n}: image not found: {Path(full).resolve()} "
                    "(paths are relative to the manifest's folder)"
                )
            caption = row[2].strip() if len(header) == 3 and row[2].strip() else None
            records.append(Record(resolved, index[label], caption, n))
    except csv.Error as e:
        raise DataError(f"{src}:row {rows.line_num}: malformed CSV: {e}") from None
    if header is None:
        raise DataError(f"{src}: empty manifest; expected a header 'path,label[,caption]' and one row per image")
    if not records:
        raise DataError(f"{src}: empty manifest: a header but no images")
    return Manifest(src, classes, tuple(records))


def _resolve_file(p: str, folders: dict[str, tuple[str, Path]]) -> Path | None:
    """``Path(p).resolve()`` when ``p`` is a regular file (or a link to one), else None."""
    parent, name = os.path.split(p)
    folder = folders.get(parent)
    if folder is None:
        real = os.path.realpath(parent)
        folder = folders[parent] = (real, Path(real))
    cand = os.path.join(folder[0], name)
    try:
        mode = os.lstat(cand).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        target = Path(cand).resolve()
        return target if target.is_file() else None
    # the folder's Path is built once: a child of it parses only its own name
    return folder[1] / name if stat.S_ISREG(mode) and name not in ("", ".", "..") else None


def _read_folder(src: Path, classes: tuple[str, ...]) -> Manifest:
    index = {c: i for i, c in enumerate(classes)}
    records: list[Record] = []
    entries = sorted(e for e in src.iterdir() if not e.name.startswith("."))
    for e in entries:
        if not e.is_dir():
            raise DataError(f"{e}: stray file in an image-folder manifest; expected only one sub-folder per class")
        if e.name not in index:
            raise _unknown_label(f"{e}", e.name, classes, what="class folder")
    for e in sorted(entries, key=lambda d: index[d.name]):
        for f in sorted(x for x in e.iterdir() if not x.name.startswith(".")):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{f}: not an image file (expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
            records.append(Record(f.resolve(), index[e.name], None, len(records) + 1))
    if not records:
        raise DataError(f"{src}: empty manifest: no images in the class folders")
    return Manifest(src, classes, tuple(records))


def write_manifest(
    path: str | os.PathLike, rows: Iterable[tuple[str, str, str | None]], *, captions: bool = False
) -> None:
    """Write a CSV manifest of ``(relative path, class name, caption)`` rows (atomic)."""

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
    todo = list(pairs) if pairs is not None else [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    # a digest names every record's path and every image's bytes: pairs of digests found disjoint once
    # are disjoint again
    key = tuple((manifests[a].digest(), manifests[b].digest()) for a, b in todo)
    if key in _DISJOINT:
        return
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
            raise DataError(
                f"splits {a!r} and {b!r} overlap ({len(same)} image(s)), e.g. {ma.where(i)} "
                f"({ma.records[i].path}) and {mb.where(j)} ({mb.records[j].path}) are {how}; "
                "held-out and validation images must not be used elsewhere"
            )
    _DISJOINT.add(key)


_DISJOINT: set[tuple] = set()
