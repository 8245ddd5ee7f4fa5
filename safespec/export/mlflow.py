"""``safespec export mlflow``: a finished run directory -> an MLflow run, and a release -> a model version.

Everything comes from the run directory (result.json, validated and consistent, and the files beside it), as
the report does: no spec re-reading, no model loading, no torch. What goes where (docs/mlflow.md):

- the run's **parameters**: the spec, flattened (``optimize.lr``, ``protect.0.tolerance``), as this safespec
  reads it (defaults filled in); a value longer than MLflow allows is cut, and says so (the spec itself is an
  artifact);
- its **metrics**: the verdict and the release gate as 1/0, the target's accuracies, and per capability
  ``capability/<name>/...``: old and new accuracy, change, drop bound, tolerance, flips, n, and whether its
  status meets the requirement (1/0);
- its **tags**: the verdict, the spec and weights digests, the parent model, each capability's status,
  the lineage release; its **artifacts**: result.json, report.html, junit.xml, the trajectory, spec.yaml;
- a **model version** of the registered model, only for a release: certified, its target's goal met, and,
  in a lineage, registered by the lineage as a release (fail closed). Only then is the model file uploaded,
  after its weights digest was checked against result.json's. An uncertified run is logged, never registered.

The export is idempotent: a run directory exported twice gives one MLflow run (found by the sha256 of its
result.json) and one model version (found by its weights digest).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from ..errors import RunError, SafespecError, SpecError
from ..report import RunData, load_run
from ..result import Result, meets
from ..spec import MODEL_NAME_PATTERN, Spec, parse_spec, parse_spec_data
from .weights import safetensors_digest

INSTALL_HINT = "pip install 'safespec[mlflow]'"
#: MLflow's limits (mlflow.utils.validation): a parameter's value, a tag's value, a key, items per batch
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
CUT = "... [cut at MLflow's limit; the whole spec is the artifact spec.yaml]"
#: The first request fails fast (an unreachable store is one line within seconds, not minutes of MLflow's
#: retries); the rest retry a little. A variable the user set wins.
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
WORK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
RUN_FILES = ("result.json", "report.html", "junit.xml")


class ExportError(SafespecError):
    """The export could not be done; the run directory is untouched (one line, exit 2)."""


@dataclass(frozen=True)
class MlflowExport:
    """What an export did."""

    tracking_uri: str  # as shown: credentials masked
    experiment: str
    run_id: str
    reused_run: bool  # the same result.json was exported before: its MLflow run is kept, nothing logged again
    model_name: str
    version: str | None  # the model version holding the release, None when the run is not registered
    reused_version: bool
    registration: str  # why the run was, or was not, registered

    @property
    def registered(self) -> bool:
        return self.version is not None

    def lines(self) -> list[str]:
        """What the command prints."""
        where = f"experiment {self.experiment!r} at {self.tracking_uri}"
        first = (
            f"MLflow run {self.run_id} in {where} already holds this result.json; nothing logged again"
            if self.reused_run
            else f"logged MLflow run {self.run_id} in {where}"
        )
        return [first, self.registration]


# ------------------------------------------------------------------------------------------ the rule
def registration_refusal(result: Result) -> str | None:
    """Why this run must not become a model version, or None when it is a release: certified, its target's
    goal met (:attr:`Result.release_ok`, the gate ``safespec run`` exits by), and, in a lineage, registered by
    the lineage as a release (a run it did not release is no version either)."""
    if result.verdict != "certified":
        return "not registered: the verdict is not certified"
    if not result.release_ok:
        return "not registered: the target did not reach its goal"
    lin = result.lineage
    if lin is not None and lin.release is None:
        why = lin.registration.removeprefix("not registered: ")
        return f"not registered: the lineage did not release it ({why})"
    return None


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _Run:
    """A finished run directory, checked, with what the export logs from it."""

    data: RunData
    result_sha256: str
    spec_text: str | None
    spec: Spec | None  # the spec as this safespec reads it (None when it no longer does, or there is none)
    spec_data: Any  # what the spec's parameters are flattened from

    @property
    def typed(self) -> Result:
        return self.data.typed


def _read_run(run_dir: Path) -> _Run:
    data = load_run(run_dir)  # one RunError line: not a run, not finished, failed, damaged or inconsistent
    where = run_dir / "result.json"
    sha = hashlib.sha256(where.read_bytes()).hexdigest()
    for name in RUN_FILES[1:]:
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir / name}: not found; render it again with: safespec report {run_dir}")
    info = data.typed.spec
    text = info.text if info is not None else None
    if text is None:
        return _Run(data, sha, None, None, None)
    digest = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    if info is not None and info.digest is not None and info.digest != digest:
        raise RunError(
            f"{where}: spec.text: its digest is {digest}, not spec.digest {info.digest}; the file was edited"
        )
    recorded = data.typed.provenance.spec_digest
    if recorded is not None and recorded != digest:
        raise RunError(f"{where}: provenance.spec_digest: {recorded} is not the digest of spec.text ({digest})")
    display = f"{where} (spec.text)"
    try:
        spec = parse_spec(text, filename=display)
    except SpecError:  # a spec of an earlier safespec: its parameters as written
        try:
            raw = parse_spec_data(text, filename=display)
        except SpecError as e:
            raise RunError(e.lines[0]) from None
        return _Run(data, sha, text, None, raw)
    return _Run(data, sha, text, spec, spec.model_dump(mode="json", by_alias=True))


def _model_file(run: _Run) -> tuple[Path, str]:
    """The certified model's file and digest; refuses a file whose weights are not the certified ones."""
    where = run.data.run_dir / "result.json"
    new = run.typed.provenance.new_model or {}
    digest, rel = new.get("digest"), new.get("path")
    if not digest or not rel:
        raise RunError(f"{where}: provenance.new_model: names no model file and digest; there is nothing to register")
    path = Path(rel) if Path(rel).is_absolute() else run.data.run_dir / rel
    if path.suffix != ".safetensors":
        raise RunError(f"{path}: only a .safetensors model can be registered (its digest is checked before upload)")
    if not path.is_file():
        raise RunError(f"{path}: the certified model file is missing (provenance.new_model.path); nothing exported")
    lin = run.typed.lineage
    if lin is not None and lin.release is not None and lin.release.digest != digest:
        raise RunError(f"{where}: lineage.release.digest: {lin.release.digest} is not the new model's {digest}")
    actual = safetensors_digest(path)
    if actual != digest:
        raise RunError(f"{path}: its weights digest is {actual}, not the certified {digest}; nothing exported")
    return path, digest


def require_mlflow() -> None:
    """Fail before a run's training starts when its spec exports to MLflow and MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise ExportError(f"the MLflow export needs MLflow, which is not installed: {INSTALL_HINT}")


# ------------------------------------------------------------------------------------------ what is logged
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]+")


def _segment(name: str, limit: int = 120) -> str:
    """A name as one segment of an MLflow key: the characters MLflow takes everywhere, no path tricks."""
    s = _KEY_CHARS.sub("_", name).strip() or "_"
    if set(s) <= {"."}:
        s = s.replace(".", "_")
    return s[:limit]


def _unique(names: list[str], limit: int = 120) -> list[str]:
    """One key segment per name, distinct (a clash after cleaning gets '_2', '_3', ...)."""
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = _segment(name, limit)
        s, i = base, 1
        while s in taken:
            i += 1
            s = f"{base[: limit - len(str(i)) - 1]}_{i}"
        taken.add(s)
        out.append(s)
    return out


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _cut(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(CUT)] + CUT


def flatten_spec(data: Any) -> dict[str, str]:
    """The spec as MLflow parameters: nested keys joined by '.', list items by their index, a list of plain
    values as one JSON value; values as YAML writes them (``true``, ``null``), cut at MLflow's limit."""
    out: dict[str, str] = {}

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, f"{key}.{_segment(str(k))}" if key else _segment(str(k)))
        elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            for i, sub in enumerate(v):
                walk(sub, f"{key}.{i}")
        else:
            out[key[:MAX_KEY]] = _cut(_text(v), MAX_PARAM_VALUE)

    if isinstance(data, dict):
        walk(data, "")
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    return float(v) if isinstance(v, (int, float)) else None


def run_metrics(result: Result) -> dict[str, float]:
    """The verdict, the gate, the target and every capability, as numbers (a missing value is not logged)."""
    out: dict[str, float | None] = {
        "certified": _number(result.verdict == "certified"),
        "release_ok": _number(result.release_ok),
        "target/old_accuracy": _number(result.target.old_accuracy),
        "target/new_accuracy": _number(result.target.new_accuracy),
        "target/improvement": _number(result.target.improvement),
        "target/goal_met": _number(result.target.goal_met),
    }
    keys = _unique([c.name for c in result.capabilities])
    for key, cap in zip(keys, result.capabilities):
        for field in ("old_accuracy", "new_accuracy", "accuracy_change", "drop_upper_bound", "tolerance"):
            out[f"capability/{key}/{field}"] = _number(getattr(cap, field))
        for field in ("negative_flips", "positive_flips", "n"):
            out[f"capability/{key}/{field}"] = _number(getattr(cap, field))
        out[f"capability/{key}/meets_requirement"] = _number(meets(cap.status, result.require))
    return {k: v for k, v in out.items() if v is not None}


def _lineage_tags(result: Result) -> dict[str, str]:
    lin = result.lineage
    if lin is None or lin.release is None:
        return {}
    parent = lin.ancestors[-1].id if lin.ancestors else 0  # the first release's parent is the origin, release 0
    return {
        "safespec.release": str(lin.release.id),
        "safespec.parent_release": str(parent),
        "safespec.lineage": lin.dir,
    }


def model_tags(run: _Run) -> dict[str, str]:
    """What identifies a release: the tags of its model version (and of its run)."""
    r = run.typed
    prov = r.provenance
    tags = {
        "safespec.verdict": r.verdict,
        "safespec.require": r.require,
        "safespec.goal_met": "true" if r.target.goal_met else "false",
        "safespec.release_ok": "true" if r.release_ok else "false",
        "safespec.spec_name": r.spec.name if r.spec is not None and r.spec.name else None,
        "safespec.spec_digest": prov.spec_digest or (r.spec.digest if r.spec is not None else None),
        "safespec.digest": (prov.new_model or {}).get("digest"),
        "safespec.parent": (prov.old_model or {}).get("digest"),
        "safespec.method": r.method,
        "safespec.target": r.target.class_,
        "safespec.result_sha256": run.result_sha256,
        **_lineage_tags(r),
    }
    return {k: _cut(v, MAX_TAG_VALUE) for k, v in tags.items() if v is not None}


def run_tags(run: _Run, registration: str) -> dict[str, str]:
    r = run.typed
    tags = model_tags(run)
    tags["safespec.registration"] = registration
    tags["safespec.run_dir"] = _cut(str(run.data.run_dir.resolve()), MAX_TAG_VALUE)
    tags["safespec.exported_by"] = f"safespec {__version__}"
    keys = _unique([c.name for c in r.capabilities])
    for key, cap in zip(keys, r.capabilities):
        tags[f"safespec.status.{key}"] = cap.status
        if key != cap.name:
            tags[f"safespec.capability.{key}"] = _cut(cap.name, MAX_TAG_VALUE)
    if r.spec is not None and r.spec.description:
        tags["mlflow.note.content"] = _cut(r.spec.description, MAX_TAG_VALUE)
    return tags


# ------------------------------------------------------------------------------------------ MLflow
def _import_mlflow() -> Any:
    # MLflow's usage telemetry would send data to an outside host from inside a release pipeline; it stays
    # off unless the user turned it on (set MLFLOW_DISABLE_TELEMETRY=false)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError as e:
        raise ExportError(f"the MLflow export needs MLflow, which is not installed ({e}): {INSTALL_HINT}") from None
    return mlflow


@contextlib.contextmanager
def _environ(defaults: dict[str, str]) -> Iterator[None]:
    """Set the variables the user has not set, for the duration; then remove them again."""
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's and its store's info lines and warnings are not the command's output."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(mlflow|alembic|sqlalchemy|pydantic)(\.|$)")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a tracking store raises (MLflow's own, the HTTP client's, the database's, the disk's)."""
    from mlflow.exceptions import MlflowException

    kinds: list[type[BaseException]] = [MlflowException, OSError, ImportError]
    for module, name in (("requests", "RequestException"), ("sqlalchemy.exc", "SQLAlchemyError")):
        try:
            kinds.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:
            pass
    return tuple(kinds)


def show_uri(uri: str) -> str:
    """A tracking URI as printed: a user name or password in it is masked."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return uri.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
    return uri


def _why(exc: BaseException) -> str:
    """The gist of a store's error, one line: the network's reason when there is one."""
    text = " ".join(str(getattr(exc, "message", None) or exc).split()) or type(exc).__name__
    text = re.sub(r"//[^/@\s]+@", "//***@", text)
    timeout = re.search(r"(?:Read|Connect|Connection) timed out\.?(?: \((?:read |connect )?timeout=([\d.]+)\))?", text)
    if timeout:
        secs = f" within {timeout.group(1)} s" if timeout.group(1) else ""
        return f"no answer{secs} (MLFLOW_HTTP_REQUEST_TIMEOUT sets the limit)"
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip().rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."


def _ms(stamp: str | None) -> int | None:
    if not stamp:
        return None
    try:
        return int(_dt.datetime.fromisoformat(stamp).timestamp() * 1000)
    except ValueError:
        return None


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of a registered model ([] when there is none); names follow MODEL_NAME_PATTERN, so
    the filter holds no quote."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=200, page_token=token)
        out += list(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def export_mlflow(
    run_dir: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> MlflowExport:
    """Log a finished run directory to MLflow and register it as a model version when it is a release.

    Settings: the arguments, else the spec's ``export.mlflow`` (from result.json), else MLflow's own
    defaults for the tracking URI (``MLFLOW_TRACKING_URI``), the spec's name for the registered model and
    the model's name for the experiment. Any problem is one :class:`SafespecError` line; the run directory is
    never changed."""
    run_dir = Path(run_dir)
    run = _read_run(run_dir)
    conf = run.spec.export.mlflow if run.spec is not None and run.spec.export is not None else None
    uri = tracking_uri or (conf.tracking_uri if conf else None)
    name = model_name or (conf.model_name if conf else None) or (run.typed.spec.name if run.typed.spec else None)
    if not name:
        raise ExportError(f"{run_dir / 'result.json'}: names no spec; give the registered model's name (--model-name)")
    if not re.fullmatch(MODEL_NAME_PATTERN, name) or len(name) > MAX_KEY:
        raise ExportError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    exp_name = experiment or (conf.experiment if conf else None) or name
    refusal = registration_refusal(run.typed)
    model = _model_file(run) if refusal is None else None  # checked before anything is logged

    mlflow = _import_mlflow()
    errors = _store_errors()
    with _quiet():
        shown = show_uri(uri or mlflow.get_tracking_uri())
        try:
            with _environ(PROBE_HTTP):
                client = mlflow.MlflowClient(tracking_uri=uri)
                exp = client.get_experiment_by_name(exp_name)
        except errors as e:
            raise ExportError(f"{shown}: cannot open the MLflow tracking store: {_why(e)}") from None
        try:
            with _environ(WORK_HTTP):
                return _export(mlflow, client, run, exp, exp_name, name, refusal, model, shown, log)
        except errors as e:
            raise ExportError(f"{shown}: the MLflow export failed: {_why(e)}") from None


def _export(mlflow, client, run: _Run, exp, exp_name, name, refusal, model, shown, log) -> MlflowExport:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    if exp is None:
        try:
            experiment_id = client.create_experiment(exp_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(exp_name).experiment_id  # created meanwhile
    elif exp.lifecycle_stage != "active":
        raise ExportError(f"{shown}: experiment {exp_name!r} is deleted; restore it or choose another (--experiment)")
    else:
        experiment_id = exp.experiment_id

    versions = _versions(client, name) if model is not None else []
    tags = model_tags(run)
    held = next(
        (
            v
            for v in sorted(versions, key=lambda v: int(v.version))
            if v.tags.get("safespec.digest") == tags["safespec.digest"]
        ),
        None,
    )
    release = tags.get("safespec.release")
    clash = [v for v in versions if release and v.tags.get("safespec.release") == release and v is not held]
    if held is None and clash:
        raise ExportError(
            f"{shown}: registered model {name!r} already holds release {release} as version {clash[0].version}, with "
            f"weights {clash[0].tags.get('safespec.digest')}, not {tags['safespec.digest']}; is it another lineage's model?"
        )

    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`safespec.result_sha256` = '{run.result_sha256}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    pending = f"a release: to be registered as a version of model {name!r}"
    if found:
        run_id, reused = found[0].info.run_id, True
        artifact_uri = found[0].info.artifact_uri
    else:
        reused = False
        prov = run.typed.provenance
        title = run.typed.spec.name if run.typed.spec is not None and run.typed.spec.name else "safespec"
        created = client.create_run(
            experiment_id, start_time=_ms(prov.started), run_name=f"{title} ({run.typed.method})"
        )
        run_id, artifact_uri = created.info.run_id, created.info.artifact_uri
        try:
            _log_run(client, run, run_id, model, refusal or pending, Metric, Param, RunTag)
            client.set_terminated(run_id, "FINISHED", end_time=_ms(prov.finished))
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")  # a half-logged run is never taken for an export
            raise
        log(f"logged MLflow run {run_id}")

    if model is None:
        assert refusal is not None
        return MlflowExport(shown, exp_name, run_id, reused, name, None, False, refusal)
    if held is not None:
        note = f"already registered as version {held.version} of model {name!r}"
        client.set_tag(run_id, "safespec.registration", f"registered as version {held.version} of model {name!r}")
        return MlflowExport(shown, exp_name, run_id, reused, name, str(held.version), True, note)
    try:
        client.create_registered_model(name, description="Releases certified by safespec (docs/mlflow.md).")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    r = run.typed
    what = f"release {release} of the lineage" if release else "a release"
    desc = f"safespec {what}: {r.verdict}, target {r.target.class_} {_pct(r.target.old_accuracy)} -> {_pct(r.target.new_accuracy)}"
    mv = client.create_model_version(name, f"{artifact_uri}/model", run_id=run_id, tags=tags, description=desc)
    note = f"registered as version {mv.version} of model {name!r}"
    client.set_tag(run_id, "safespec.registration", note)
    if release:
        note += f" (release {release} of the lineage)"
        if str(mv.version) != release:
            note += "; its version number is not the release's (a release was not exported to this model): the tag safespec.release maps them"
    return MlflowExport(shown, exp_name, run_id, reused, name, str(mv.version), False, note)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _log_run(client, run: _Run, run_id: str, model, registration: str, Metric, Param, RunTag) -> None:
    r = run.typed
    stamp = _ms(r.provenance.finished) or int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)
    params = [Param(k, v) for k, v in flatten_spec(run.spec_data).items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
    metrics = [Metric(k, v, stamp, 0) for k, v in run_metrics(r).items()]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
    folder = run.data.run_dir
    for name in RUN_FILES:
        client.log_artifact(run_id, str(folder / name))
    trajectory = folder / ((r.training.trajectory if r.training else None) or "trajectory.jsonl")
    if trajectory.is_file() and trajectory.resolve().is_relative_to(folder.resolve()):
        client.log_artifact(run_id, str(trajectory))
    if run.spec_text is not None:
        with tempfile.TemporaryDirectory(prefix="safespec-export-") as tmp:
            spec_file = Path(tmp) / "spec.yaml"
            spec_file.write_bytes(run.spec_text.encode("utf-8"))  # the bytes the spec digest names
            client.log_artifact(run_id, str(spec_file))
    if model is not None:
        client.log_artifact(run_id, str(model[0]), "model")
    # the tags last: a run that names its result (safespec.result_sha256) holds all of it
    tags = [RunTag(k, v) for k, v in run_tags(run, registration).items()]
    for i in range(0, len(tags), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i : i + PARAMS_PER_BATCH])
