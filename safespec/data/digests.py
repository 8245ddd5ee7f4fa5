"""Digests of data files, remembered across runs by (path, size, mtime, ctime, inode), so that a second run
over the same data does not hash every image again."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..errors import DataError, atomic_write_text


def cache_root() -> Path:
    """Where safespec keeps what it can recompute (predictions, image features, file digests)."""
    return Path(os.environ.get("SAFESPEC_CACHE_DIR", Path.home() / ".cache" / "safespec"))


class _DigestStore:
    """File digests that outlive the process, so that a second ``safespec verify`` does not hash every
    image again. An entry is valid only while the file's (size, mtime_ns, ctime_ns, inode) are unchanged:
    rewriting a file changes its ctime, which no user can set back, so a re-dated file still misses.

    One small JSON file per folder of hashed files (``file-digests/<folder's hash>.json``): a process reads
    and rewrites only the folders it touches. (One file for everything grew to 150,000 entries and 28 MB
    on a machine with a few worlds, and every verify read it whole and every new digest rewrote it.)"""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.shards: dict[str, dict[str, list]] = {}
        self.dirty: set[str] = set()

    def _shard(self, folder: str) -> dict[str, list]:
        root = cache_root() / "file-digests"
        if root != self.root:  # another cache folder (SAFESPEC_CACHE_DIR changed): start over
            self.root, self.shards, self.dirty = root, {}, set()
        name = _shard_name(folder)
        shard = self.shards.get(name)
        if shard is None:
            try:
                shard = json.loads((root / f"{name}.json").read_text())
            except (OSError, ValueError):
                shard = {}
            if not isinstance(shard, dict):  # a damaged store is a cache miss, never an error
                shard = {}
            self.shards[name] = shard
        return shard

    def path_of(self, folder: str) -> Path:
        """The store's file for digests of files in ``folder``."""
        return cache_root() / "file-digests" / f"{_shard_name(folder)}.json"

    def get(self, key: str, sig: list, folder: str) -> str | None:
        e = self._shard(folder).get(key)
        return e[-1] if isinstance(e, list) and e[:-1] == sig and isinstance(e[-1], str) else None

    def put(self, key: str, sig: list, digest: str, folder: str) -> None:
        self._shard(folder)[key] = [*sig, digest]
        self.dirty.add(_shard_name(folder))

    def flush(self) -> None:
        if not self.dirty or self.root is None:
            return
        for name in sorted(self.dirty):
            try:
                atomic_write_text(self.root / f"{name}.json", json.dumps(self.shards[name], separators=(",", ":")))
            except OSError:
                pass  # a read-only cache only costs the next run the hashing
        self.dirty = set()
        # the single store of earlier versions (``file-digests.json``, up to tens of MB) is read by
        # nothing now: it goes once the per-folder store holds what this process hashed
        try:
            (self.root.parent / LEGACY_STORE).unlink(missing_ok=True)
        except OSError:
            pass


#: the one-file store of safespec before the per-folder split, removed by the first flush that writes a shard
LEGACY_STORE = "file-digests.json"


def _shard_name(folder: str) -> str:
    return hashlib.sha256(folder.encode()).hexdigest()[:20]


_DIGEST_STORE = _DigestStore()
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, cached in memory and on disk by (absolute path, size, mtime_ns,
    ctime_ns, inode)."""
    # manifest records are resolved Paths already: no Path is built or parsed again for them (this runs
    # once per image each time a spec is loaded)
    p = path if isinstance(path, Path) else Path(path)
    s = os.fspath(p)
    try:
        st = os.stat(s)
    except OSError as e:
        raise DataError(f"{p}: cannot read file: {e.strerror or e}") from None
    key = s if os.path.isabs(s) else str(p.resolve())
    sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    entry = (key, *sig)
    folder = os.path.dirname(key)
    d = _FILE_DIGESTS.get(entry) or _DIGEST_STORE.get(key, sig, folder)
    if d is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        _DIGEST_STORE.put(key, sig, d, folder)
    _FILE_DIGESTS[entry] = d
    return d


#: A file changed this recently could change again within one timestamp tick without its signature changing
#: ("racily clean", as git calls it): what is derived from it is not remembered.
RACY_SECONDS = 2.0

Signature = tuple[str, tuple[int, int, int, int]]


def signature_of(path: str | os.PathLike) -> Signature | None:
    """A file's identity as derived digests are remembered by: its absolute path and (size, mtime_ns,
    ctime_ns, inode). None when the file is gone or changed too recently to be trusted. Take it before
    reading the file: a file that changes while it is read then misses next time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_SECONDS * 1e9:
        return None
    return os.path.abspath(path), (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def remembered(kind: str, signature: Signature, options: str = "") -> str | None:
    """A digest of ``kind`` derived from the file at ``signature`` (and ``options``), if one was
    remembered while the file had that signature."""
    folder = os.path.dirname(signature[0])
    return _DIGEST_STORE.get(_derived_key(kind, signature[0], options), list(signature[1]), folder)


def remember(kind: str, signature: Signature, options: str, digest: str) -> None:
    """Remember ``digest`` for :func:`remembered` (on disk, beside the file digests)."""
    _DIGEST_STORE.put(
        _derived_key(kind, signature[0], options), list(signature[1]), digest, os.path.dirname(signature[0])
    )
    _DIGEST_STORE.flush()


def _derived_key(kind: str, path: str, options: str) -> str:
    return f"{kind}:{hashlib.sha256(options.encode()).hexdigest()[:16]}:{path}"
