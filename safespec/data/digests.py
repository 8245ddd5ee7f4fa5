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
            try:
                atomic_write_text(self.path, json.dumps(self.entries, separators=(",", ":")))
            except OSError:
                pass  # a read-only cache only costs the next run the hashing
            self.dirty = False


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
    return _DIGEST_STORE.get(_derived_key(kind, signature[0], options), list(signature[1]))


def remember(kind: str, signature: Signature, options: str, digest: str) -> None:
    """Remember ``digest`` for :func:`remembered` (on disk, beside the file digests)."""
    _DIGEST_STORE.put(_derived_key(kind, signature[0], options), list(signature[1]), digest)
    _DIGEST_STORE.flush()


def _derived_key(kind: str, path: str, options: str) -> str:
    return f"{kind}:{hashlib.sha256(options.encode()).hexdigest()[:16]}:{path}"
