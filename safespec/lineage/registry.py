"""The lineage registry: a folder that records every release of a model, in order, and what it was certified for.

Layout (docs/lineage.md)::

    DIR/index.json                      the releases in order (the registry's one source of truth)
    DIR/models/<hex>.safetensors        each release's model, named by its weights digest
    DIR/releases/0000/                  the origin: the first cycle's old model (release.json only)
    DIR/releases/0001/                  spec.yaml, result.json, report.html, junit.xml, release.json
    DIR/.lock                           held while a release is written

Every file a release holds is listed in the index with its SHA-256, so ``safespec lineage verify`` can tell
a tampered or missing file from an intact one. Writes are atomic (a release's folder is renamed into place,
the index replaced last) and serialised by an exclusive lock, so concurrent runs leave either the old
registry or the new one, never a mixture. Nothing here imports torch: a model's weights digest, which needs
the tensors, is checked by a function the caller passes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SafespecError, atomic_write_json, current_umask

INDEX = "index.json"
INDEX_FORMAT = 1
LOCK = ".lock"
#: Seconds a writer waits for another's lock before it gives up with one line.
LOCK_TIMEOUT_S = 120.0
#: The files a release (other than the origin) keeps from its run directory.
RUN_FILES = ("result.json", "report.html", "junit.xml")


class LineageError(SafespecError):
    """The registry is unusable (a damaged index, a bad path) or refuses a release: one line, exit 2."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class CertifiedCapability:
    """A capability a release was certified for: its name and classes (what later cycles carry)."""

    name: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """One entry of the index. ``id`` 0 is the origin (the first cycle's old model, certified for nothing)."""

    id: int
    digest: str  # the model's weights digest (the name of its file under models/)
    parent: str | None  # the parent release's digest (None for the origin)
    name: str  # the spec's name ('origin' for release 0)
    target: str | None  # the class this release improved
    classes: tuple[str, ...]
    certified: tuple[CertifiedCapability, ...]
    accuracy: Mapping[str, float]  # per class, held-out accuracy of this release as its own cycle measured it
    created: str
    files: Mapping[str, str]  # path relative to the registry -> sha256

    @property
    def label(self) -> str:
        return "origin" if self.id == 0 else f"release {self.id}"

    @property
    def model_file(self) -> str:
        return model_name(self.digest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "digest": self.digest,
            "parent": self.parent,
            "name": self.name,
            "target": self.target,
            "classes": list(self.classes),
            "certified": [{"name": c.name, "classes": list(c.classes)} for c in self.certified],
            "accuracy": dict(self.accuracy),
            "created": self.created,
            "files": dict(self.files),
        }


def model_name(digest: str) -> str:
    """The model file of a weights digest, relative to the registry."""
    return f"models/{digest.split(':', 1)[-1]}.safetensors"


def _release_from(entry: Any, where: str) -> Release:
    """An index entry, checked field by field so that a damaged index names what is wrong."""
    if not isinstance(entry, dict):
        raise LineageError(f"{where}: expected an object")

    def get(key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        v = entry.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            raise LineageError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {v!r}")
        return v

    rid, digest = get("id", int), get("digest", str)
    parent, name, target = get("parent", str, optional=True), get("name", str), get("target", str, optional=True)
    classes = tuple(str(x) for x in get("classes", list))
    certified = []
    for j, c in enumerate(get("certified", list)):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("classes"), list):
            raise LineageError(f"{where}.certified[{j}]: expected {{name, classes}}")
        certified.append(CertifiedCapability(c["name"], tuple(str(x) for x in c["classes"])))
    acc = get("accuracy", dict)
    created, files = get("created", str), get("files", dict)
    return Release(
        id=rid,
        digest=digest,
        parent=parent,
        name=name,
        target=target,
        classes=classes,
        certified=tuple(certified),
        accuracy={str(k): float(v) for k, v in acc.items() if isinstance(v, (int, float))},
        created=created,
        files={str(k): str(v) for k, v in files.items()},
    )


@dataclass
class Problem:
    """One finding of ``verify``."""

    release: str
    message: str

    def __str__(self) -> str:
        return f"{self.release}: {self.message}"


@dataclass
class Registry:
    """A lineage registry folder. Reading never creates anything; the first release creates the folder."""

    path: Path
    releases: list[Release] = field(default_factory=list)

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: str | os.PathLike) -> Registry:
        """The registry at ``path`` (empty when the folder or its index does not exist yet)."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise LineageError(f"{p}: is a file, expected the lineage registry's folder")
        reg = cls(p)
        reg.releases = reg._read_index()
        return reg

    def _read_index(self) -> list[Release]:
        index = self.path / INDEX
        if not index.exists():
            if self.path.exists() and (self.path / "releases").exists():
                raise LineageError(f"{index}: missing, but {self.path / 'releases'} holds releases")
            return []
        where = str(index)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise LineageError(f"{where}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise LineageError(f"{where}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise LineageError(f"{where}: format: expected {INDEX_FORMAT}, got {_get(data, 'format')!r}")
        entries = data.get("releases")
        if not isinstance(entries, list):
            raise LineageError(f"{where}: releases: expected an array")
        releases = [_release_from(e, f"{where}: releases[{i}]") for i, e in enumerate(entries)]
        for i, r in enumerate(releases):
            if r.id != i:
                raise LineageError(
                    f"{where}: releases[{i}].id: expected {i} (releases are numbered in order), got {r.id}"
                )
        return releases

    @property
    def latest(self) -> Release | None:
        return self.releases[-1] if self.releases else None

    def model_path(self, release: Release) -> Path:
        return self.path / release.model_file

    def release(self, ref: str) -> Release:
        """A release by its number, 'latest', 'origin' or a (prefix of its) digest."""
        if not self.releases:
            raise LineageError(f"{self.path}: the lineage has no release yet")
        if ref == "latest":
            return self.releases[-1]
        if ref == "origin":
            return self.releases[0]
        if ref.isdigit():
            k = int(ref)
            if k < len(self.releases):
                return self.releases[k]
            raise LineageError(f"release {k}: the lineage has releases 0 to {len(self.releases) - 1}")
        hits = [
            r for r in self.releases if r.digest == ref or r.digest.split(":", 1)[-1].startswith(ref.split(":")[-1])
        ]
        if len(hits) == 1:
            return hits[0]
        raise LineageError(f"release {ref!r}: {'no' if not hits else 'more than one'} release has that digest")

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the registry's exclusive lock (waiting up to ``timeout`` seconds for another writer's),
        and re-read the index under it: what a writer decides, it decides on the registry as it is."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LineageError(f"{self.path}: cannot write the lineage registry: {e.strerror or e}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise LineageError(
                            f"{self.path / LOCK}: another run has held the lineage's lock for {timeout:.0f} s; "
                            f"try again when it has finished"
                        ) from None
                    time.sleep(0.05)
            self.releases = self._read_index()
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def add(
        self,
        *,
        model_file: Path,
        digest: str,
        parent: str | None,
        name: str,
        target: str | None,
        classes: Sequence[str],
        certified: Sequence[CertifiedCapability],
        accuracy: Mapping[str, float],
        created: str,
        run_files: Mapping[str, Path] | None = None,
        spec_text: str | None = None,
    ) -> Release:
        """Append a release (call under :meth:`locked`). Its parent must be the latest release: a lineage is
        a chain, and a run that started from an older release would silently fork it."""
        latest = self.latest
        if (latest.digest if latest else None) != parent:
            have = f"{latest.label} ({latest.digest})" if latest else "no release"
            raise LineageError(
                f"{self.path}: the lineage moved on while this run worked: its latest is {have}, but this model's "
                f"parent is {parent}; rerun the cycle from the latest release (model.from: lineage)"
            )
        rid = len(self.releases)
        folder = f"releases/{rid:04d}"
        files: dict[str, str] = {}
        mname = model_name(digest)
        target_model = self.path / mname
        if not target_model.exists():
            _copy_atomic(model_file, target_model)
        files[mname] = file_sha256(target_model)
        release = Release(
            rid, digest, parent, name, target, tuple(classes), tuple(certified), dict(accuracy), created, {}
        )
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{rid:04d}."))
        try:
            if spec_text is not None:
                (tmp / "spec.yaml").write_text(spec_text, encoding="utf-8")
            for fname, src in (run_files or {}).items():
                shutil.copyfile(src, tmp / fname)
            (tmp / "release.json").write_text(json.dumps(release.to_dict(), indent=2) + "\n", encoding="utf-8")
            umask = current_umask()  # readable as the user's umask says, like every other output
            for f in sorted(tmp.iterdir()):
                os.chmod(f, 0o666 & ~umask)
                files[f"{folder}/{f.name}"] = file_sha256(f)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
            dest = self.path / folder
            if dest.exists():  # left by a writer that died before its index was replaced: not a release
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        release = dataclasses.replace(release, files=files)  # the index lists what the folder holds
        self._write_index([*self.releases, release])
        self.releases.append(release)
        return release

    def _write_index(self, releases: Sequence[Release]) -> None:
        atomic_write_json(self.path / INDEX, {"format": INDEX_FORMAT, "releases": [r.to_dict() for r in releases]})
        os.chmod(self.path / INDEX, 0o644)

    # ------------------------------------------------------------------ checking
    def verify(
        self,
        *,
        read_result: Callable[[dict], str | None],
        weights_digest: Callable[[Path], str] | None = None,
    ) -> list[Problem]:
        """Every problem of the registry: a stored file missing or changed since it was registered, a broken
        parent chain, a release whose result.json does not parse or is not a certified release of that model
        (``read_result`` returns why, or None). With ``weights_digest`` each model's weights are re-hashed too."""
        problems: list[Problem] = []
        prev: Release | None = None
        for r in self.releases:
            where = r.label
            expect_parent = prev.digest if prev else None
            if r.parent != expect_parent:
                problems.append(
                    Problem(where, f"parent {r.parent} is not the previous release's digest {expect_parent}")
                )
            if r.model_file not in r.files:
                problems.append(Problem(where, f"the index lists no hash of its model {r.model_file}"))
            for rel, want in r.files.items():
                f = self.path / rel
                if not f.is_file():
                    problems.append(Problem(where, f"{rel}: missing"))
                elif file_sha256(f) != want:
                    problems.append(Problem(where, f"{rel}: changed since it was registered (SHA-256 differs)"))
            model = self.path / r.model_file
            if weights_digest is not None and model.is_file():
                try:
                    got = weights_digest(model)
                except Exception as e:  # a damaged file: the finding, not a crash
                    problems.append(Problem(where, f"{r.model_file}: cannot be read as a model ({e})"))
                else:
                    if got != r.digest:
                        problems.append(Problem(where, f"{r.model_file}: its weights digest is {got}, not {r.digest}"))
            if r.id > 0:
                problems.extend(Problem(where, m) for m in self._check_result(r, read_result))
            prev = r
        return problems

    def _check_result(self, r: Release, read_result: Callable[[dict], str | None]) -> list[str]:
        path = self.path / f"releases/{r.id:04d}/result.json"
        if not path.is_file():
            return []  # reported as missing above
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return [f"result.json: cannot be read ({e})"]
        out = []
        why = read_result(result)
        if why:
            out.append(f"result.json: {why}")
        prov = result.get("provenance") if isinstance(result, dict) else None
        new = (prov or {}).get("new_model") or {}
        old = (prov or {}).get("old_model") or {}
        if new.get("digest") != r.digest:
            out.append(f"result.json certifies model {new.get('digest')}, not this release's {r.digest}")
        if old.get("digest") != r.parent:
            out.append(f"result.json's old model {old.get('digest')} is not this release's parent {r.parent}")
        return out


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy in chunks to a temporary file beside ``dest``, then rename (a model can be gigabytes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it private
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
