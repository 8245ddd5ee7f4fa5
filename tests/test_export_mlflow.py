"""``safespec export mlflow`` and the spec's ``export.mlflow``, against a real MLflow tracking store (SQLite, in
a temporary folder) read back through MlflowClient: what a run logs, what a release registers, what an
uncertified run never registers, and every error as one line with exit 2.

MLflow is a test dependency (``safespec[mlflow]``, installed by ``make test``): without it this module fails
to import, loudly, rather than skipping."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as the export does: no usage data sent from tests
from fixtures_report import make_result, write_run
from mlflow import MlflowClient
from world_spec import write_world_spec

from safespec.cli import main
from safespec.export import safetensors_digest
from safespec.export.mlflow import CUT, MAX_PARAM_VALUE, flatten_spec
from safespec.model import tensor_digest
from safespec.report import render_report

SPECS = Path(__file__).parent / "specs"
CERTIFIED = [("cat", [("cat", 400, 350, 0, 3)]), ("farm", [("cow", 400, 340, 1, 4)])]
VIOLATED = [("cat", [("cat", 400, 350, 0, 3)]), ("farm", [("cow", 400, 340, 30, 4)])]
MISSES_GOAL = ("dog", 400, 156, 10, 30)  # +0.05, the goal asks +0.15


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(res) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating its tables takes seconds; each test uses its own
    experiment and model names)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    """A new experiment of a local store keeps its artifacts in ./mlruns: here, the test's own folder."""
    monkeypatch.chdir(tmp_path)


def _spec_text(name: str, extra: dict | None = None) -> str:
    spec = yaml.safe_load((SPECS / "good.yaml").read_text())
    spec["name"] = name
    spec["classes"]["names"] = ["cat", "cow", "dog"]
    spec["protect"] = [{"classes": ["cat"], "tolerance": 0.03}, {"name": "farm", "classes": ["cow"], "tolerance": 0.03}]
    spec.update(extra or {})
    return yaml.safe_dump(spec, sort_keys=False)


def make_run(
    folder: Path,
    name: str,
    *,
    caps=CERTIFIED,
    target=None,
    seed: int = 1,
    parent: str = "sha256:" + "01" * 32,
    lineage: dict | None = None,
    spec_extra: dict | None = None,
) -> Path:
    """A complete run directory as the runner leaves it: a result.json whose digests agree with its spec text
    and its model file, and the report rendered from it."""
    text = _spec_text(name, spec_extra)
    result = make_result(caps, name=name, **({"target": target} if target else {}))
    digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    result["spec"].update({"text": text, "digest": digest})
    tensors = {"w": torch.arange(4, dtype=torch.float32) + seed, "heads.b": torch.ones(2, 3, dtype=torch.bfloat16)}
    (folder / "models").mkdir(parents=True)
    save_file(tensors, str(folder / "models" / "penalty.safetensors"))
    result["provenance"].update(
        {
            "spec_digest": digest,
            "old_model": {"source": "world:v1", "digest": parent},
            "new_model": {"path": "models/penalty.safetensors", "digest": tensor_digest(tensors)},
        }
    )
    if lineage is not None:
        result["lineage"] = copy.deepcopy(lineage)
        if lineage["release"] is not None:  # the release holds this run's model
            result["lineage"]["release"]["digest"] = result["provenance"]["new_model"]["digest"]
    write_run(folder, result)
    render_report(folder)
    return folder


def _lineage(release: int | None, ancestors: list[tuple[int, str]]) -> dict:
    return {
        "dir": "/srv/registry",
        "ancestors": [{"id": i, "label": "origin" if i == 0 else f"release {i}", "digest": d} for i, d in ancestors],
        "carried": [],
        "budgets": [],
        "release": None if release is None else {"id": release, "digest": None},
        "registration": f"registered as release {release} of /srv/registry"
        if release is not None
        else "not registered: lineage.register is false",
    }


def _result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------------------------------ a release
def test_a_certified_run_is_logged_and_its_model_registered(store, tmp_path):
    run = make_run(tmp_path / "run", "dog-v2")
    res = _cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "animals-a")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "registered as version 1 of model 'animals-a'"
    result = _result(run)
    client = MlflowClient(store)

    (logged,) = _runs(store, "animals-a")  # the experiment defaults to the model's name
    assert logged.info.status == "FINISHED"
    assert logged.info.start_time == 1735725600000 and logged.info.end_time == 1735725700000  # the run's own times
    params = logged.data.params
    assert params["name"] == "dog-v2" and params["optimize.steps"] == "100" and params["optimize.lr"] == "1e-05"
    assert params["protect.1.name"] == "farm" and params["protect.1.tolerance"] == "0.03"
    assert params["classes.names"] == '["cat", "cow", "dog"]'
    assert params["certify.confidence"] == "0.95" and params["optimize.method"] == "penalty"  # defaults filled in
    metrics = logged.data.metrics
    assert metrics["certified"] == 1.0 and metrics["release_ok"] == 1.0 and metrics["target/goal_met"] == 1.0
    assert metrics["target/new_accuracy"] == result["target"]["new_accuracy"]
    for cap in result["capabilities"]:
        for field in ("old_accuracy", "new_accuracy", "drop_upper_bound", "tolerance", "negative_flips"):
            assert metrics[f"capability/{cap['name']}/{field}"] == pytest.approx(cap[field]), (cap["name"], field)
        assert metrics[f"capability/{cap['name']}/meets_requirement"] == 1.0
        assert logged.data.tags[f"safespec.status.{cap['name']}"] == cap["status"] == "certified"
    tags = logged.data.tags
    assert tags["safespec.verdict"] == "certified"
    assert tags["safespec.spec_digest"] == result["spec"]["digest"]
    assert tags["safespec.digest"] == result["provenance"]["new_model"]["digest"]
    assert tags["safespec.registration"] == "registered as version 1 of model 'animals-a'"

    run_id = logged.info.run_id
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"result.json", "report.html", "junit.xml", "trajectory.jsonl", "spec.yaml", "model"}
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    for name in ("result.json", "report.html", "junit.xml"):
        assert (got / name).read_bytes() == (run / name).read_bytes(), name
    assert "sha256:" + hashlib.sha256((got / "spec.yaml").read_bytes()).hexdigest() == result["spec"]["digest"]
    assert safetensors_digest(got / "model" / "penalty.safetensors") == result["provenance"]["new_model"]["digest"]

    (version,) = client.search_model_versions("name = 'animals-a'")
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.source.endswith("/model")
    assert version.tags["safespec.verdict"] == "certified"
    assert version.tags["safespec.spec_digest"] == result["spec"]["digest"]
    assert version.tags["safespec.digest"] == result["provenance"]["new_model"]["digest"]
    assert version.tags["safespec.parent"] == result["provenance"]["old_model"]["digest"]

    # exported again (a retried CI step): the same MLflow run and the same version, nothing duplicated
    again = _cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "animals-a")
    assert again.exit_code == 0, again.output
    assert "already holds this result.json" in again.stdout and "already registered as version 1" in again.stdout
    assert len(_runs(store, "animals-a")) == 1
    assert len(client.search_model_versions("name = 'animals-a'")) == 1


def test_the_spec_export_section_is_the_default_and_flags_override_it(store, tmp_path):
    run = make_run(
        tmp_path / "run",
        "dog-v2",
        spec_extra={"export": {"mlflow": {"tracking_uri": store, "experiment": "from-spec", "model_name": "spec-m"}}},
    )
    res = _cli("export", "mlflow", run)
    assert res.exit_code == 0, res.output
    assert [r.data.tags["safespec.verdict"] for r in _runs(store, "from-spec")] == ["certified"]
    assert MlflowClient(store).get_registered_model("spec-m").name == "spec-m"
    res = _cli("export", "mlflow", run, "--experiment", "from-flag", "--model-name", "flag-m")
    assert res.exit_code == 0, res.output
    assert len(_runs(store, "from-flag")) == 1
    assert [str(v.version) for v in MlflowClient(store).search_model_versions("name = 'flag-m'")] == ["1"]


# ------------------------------------------------------------------------------------------ no release
@pytest.mark.parametrize(
    "kw, why",
    [
        ({"caps": VIOLATED}, "not registered: the verdict is not certified"),
        ({"target": MISSES_GOAL}, "not registered: the target did not reach its goal"),
    ],
    ids=["not-certified", "goal-missed"],
)
def test_a_run_that_is_no_release_is_logged_but_never_registered(store, tmp_path, kw, why):
    model = f"never-{len(why)}"
    run = make_run(tmp_path / "run", "dog-v2", **kw)
    res = _cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", model)
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines()[1] == why
    (logged,) = _runs(store, model)
    result = _result(run)
    assert logged.data.tags["safespec.verdict"] == result["verdict"]
    assert logged.data.tags["safespec.registration"] == why
    assert logged.data.metrics["release_ok"] == 0.0
    assert logged.data.metrics["certified"] == (1.0 if result["verdict"] == "certified" else 0.0)
    if result["verdict"] != "certified":
        assert logged.data.metrics["capability/farm/meets_requirement"] == 0.0
        assert logged.data.tags["safespec.status.farm"] == "violated"
    client = MlflowClient(store)
    assert "model" not in {a.path for a in client.list_artifacts(logged.info.run_id)}  # its weights stay home
    assert client.search_model_versions(f"name = '{model}'") == []
    assert client.search_registered_models(f"name = '{model}'") == []


# ------------------------------------------------------------------------------------------ lineage
def test_lineage_releases_map_onto_model_versions(store, tmp_path):
    origin = "sha256:" + "0a" * 32
    first = make_run(tmp_path / "r1", "cycle1", seed=1, parent=origin, lineage=_lineage(1, []))
    d1 = _result(first)["provenance"]["new_model"]["digest"]
    second = make_run(tmp_path / "r2", "cycle2", seed=2, parent=d1, lineage=_lineage(2, [(0, origin), (1, d1)]))

    for n, run in enumerate((first, second), start=1):
        res = _cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "lineage-m")
        assert res.exit_code == 0, res.output
        assert (
            res.stdout.splitlines()[1] == f"registered as version {n} of model 'lineage-m' (release {n} of the lineage)"
        )
    client = MlflowClient(store)
    versions = {str(v.version): v.tags for v in client.search_model_versions("name = 'lineage-m'")}
    assert versions["1"]["safespec.release"] == "1" and versions["1"]["safespec.parent_release"] == "0"
    assert versions["1"]["safespec.parent"] == origin
    assert versions["2"]["safespec.release"] == "2" and versions["2"]["safespec.parent_release"] == "1"
    assert versions["2"]["safespec.parent"] == versions["1"]["safespec.digest"] == d1
    assert versions["2"]["safespec.lineage"] == "/srv/registry"

    # a certified run its lineage did not release is no version
    held_back = make_run(tmp_path / "r3", "cycle3", seed=3, parent=d1, lineage=_lineage(None, [(0, origin), (1, d1)]))
    res = _cli("export", "mlflow", held_back, "--tracking-uri", store, "--model-name", "lineage-m")
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines()[1] == "not registered: the lineage did not release it (lineage.register is false)"

    # another model claiming release 2 of this registered model: refused before anything is logged
    other = make_run(tmp_path / "r4", "cycle2b", seed=4, parent=d1, lineage=_lineage(2, [(0, origin), (1, d1)]))
    before = len(_runs(store, "lineage-m"))
    line = _one_line(_cli("export", "mlflow", other, "--tracking-uri", store, "--model-name", "lineage-m"))
    assert "already holds release 2 as version 2" in line
    assert len(_runs(store, "lineage-m")) == before and len(client.search_model_versions("name = 'lineage-m'")) == 2


# ------------------------------------------------------------------------------------------ what is logged
def test_parameters_and_keys_keep_within_mlflow_limits(store, tmp_path):
    long = "x" * (MAX_PARAM_VALUE + 1000)
    caps = [("dog (budget)", [("cat", 400, 350, 0, 3)]), ("a/b", [("cow", 400, 340, 1, 4)])]
    run = make_run(tmp_path / "run", "limits", caps=caps, spec_extra={"description": long})
    res = _cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "limits-m")
    assert res.exit_code == 0, res.output
    (logged,) = _runs(store, "limits-m")
    value = logged.data.params["description"]
    assert len(value) == MAX_PARAM_VALUE and value.endswith(CUT) and value.startswith("x" * 100)
    assert len(logged.data.tags["mlflow.note.content"]) <= 8000
    assert "capability/dog _budget_/drop_upper_bound" in logged.data.metrics
    assert "capability/a_b/drop_upper_bound" in logged.data.metrics
    assert logged.data.tags["safespec.capability.a_b"] == "a/b"
    got = Path(MlflowClient(store).download_artifacts(logged.info.run_id, "spec.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(got.read_text())["description"] == long  # the artifact holds all of it


def test_flatten_spec_names_every_value():
    assert flatten_spec({"a": {"b": [1, 2], "c": None}, "p": [{"x": True}, {"x": 0.5}], "s": "t"}) == {
        "a.b": "[1, 2]",
        "a.c": "null",
        "p.0.x": "true",
        "p.1.x": "0.5",
        "s": "t",
    }


def test_the_weights_digest_needs_no_torch_and_matches_the_models(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"safespec": "{}"})
    assert safetensors_digest(path) == tensor_digest(tensors)
    path.write_bytes(path.read_bytes()[:-3])
    from safespec.errors import RunError

    with pytest.raises(RunError, match=r"ends inside its data|outside the file"):
        safetensors_digest(path)


# ------------------------------------------------------------------------------------------ errors
def test_a_model_file_that_is_not_the_certified_one_is_never_uploaded(store, tmp_path):
    run = make_run(tmp_path / "run", "tampered")
    save_file({"w": torch.zeros(4)}, str(run / "models" / "penalty.safetensors"))
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "tampered-m"))
    assert "its weights digest is" in line and "not the certified" in line and "nothing exported" in line
    (run / "models" / "penalty.safetensors").unlink()
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "tampered-m"))
    assert "the certified model file is missing" in line
    assert _runs(store, "tampered-m") == []


def test_mlflow_not_installed_is_one_line(store, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "no-mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as on a machine without it
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", store))
    assert line.endswith("pip install 'safespec[mlflow]'"), line


def test_an_unreachable_store_fails_within_seconds(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "unreachable")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # the export's own defaults, not MLflow's minutes of retries
    started = time.monotonic()
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", f"http://127.0.0.1:{port}"))
    assert time.monotonic() - started < 20
    assert line == f"http://127.0.0.1:{port}: cannot open the MLflow tracking store: [Errno 111] Connection refused"

    with socket.socket() as silent:  # a server that accepts and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # a variable the user set wins
        started = time.monotonic()
        uri = f"http://ci:secret@127.0.0.1:{silent.getsockname()[1]}"
        line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", uri))
        assert time.monotonic() - started < 20
    assert "no answer within 1 s" in line and "secret" not in line and line.startswith("http://***@127.0.0.1:")


def test_a_store_that_cannot_be_opened_is_one_line(tmp_path):
    run = make_run(tmp_path / "run", "bad-store")
    (tmp_path / "a-file").write_text("")
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", f"sqlite:///{tmp_path / 'a-file' / 'm.db'}"))
    assert "cannot open the MLflow tracking store" in line


def _state(run: Path, state: dict) -> None:
    (run / "state.json").write_text(json.dumps(state))


def _edit(run: Path, change) -> None:
    result = _result(run)
    change(result)
    (run / "result.json").write_text(json.dumps(result))


def _forge_verdict(result: dict) -> None:
    result["capabilities"][1]["status"] = "violated"
    result["capabilities"][1]["meets_requirement"] = False


def _edit_spec(result: dict) -> None:
    result["spec"]["text"] = result["spec"]["text"].replace("tolerance: 0.03", "tolerance: 0.3")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda run: _state(run, {"state": "failed", "reason": "boom"}), "the run failed (boom)"),
        (lambda run: _state(run, {"state": "running"}), "the run has not finished"),
        (lambda run: (run / "result.json").unlink(), "result.json: not found (the run did not complete"),
        (
            lambda run: (run / "result.json").write_text('{"verdict": '),
            "result.json:1:13: the result is not valid JSON",
        ),
        (lambda run: _edit(run, _forge_verdict), "verdict: 'certified' contradicts the capabilities"),
        (lambda run: _edit(run, _edit_spec), "spec.text: its digest is"),
        (lambda run: _edit(run, lambda r: r.pop("capabilities")), "capabilities: required field is missing"),
        (lambda run: (run / "report.html").unlink(), "report.html: not found; render it again with: safespec report"),
    ],
    ids=["failed", "running", "no-result", "not-json", "forged-verdict", "edited-spec", "schema", "no-report"],
)
def test_a_run_directory_that_is_not_a_completed_run_is_one_line(store, tmp_path, damage, fragment):
    run = make_run(tmp_path / "run", "damaged")
    damage(run)
    line = _one_line(_cli("export", "mlflow", run, "--tracking-uri", store, "--model-name", "damaged-m"))
    assert fragment in line, line
    assert _runs(store, "damaged-m") == []


def test_not_a_run_directory_and_bad_flags_are_one_line(store, tmp_path):
    assert _one_line(_cli("export", "mlflow", tmp_path / "nope", "--tracking-uri", store)).endswith(
        "nope: no such run directory"
    )
    run = make_run(tmp_path / "run", "flags")
    for flag, value in (("--model-name", "a/b"), ("--experiment", " "), ("--tracking-uri", "")):
        res = _cli("export", "mlflow", run, flag, value)
        assert res.exit_code == 2 and f"'{flag}'" in res.stderr and "Traceback" not in res.output, res.output


# ------------------------------------------------------------------------------------------ the spec option
def test_the_export_section_validates_and_compiles(tmp_path):
    text = (SPECS / "good.yaml").read_text() + "export:\n  mlflow:\n    tracking_uri: sqlite:///mlflow.db\n"
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace("data/", str(SPECS / "data") + "/"))
    assert _cli("validate", spec).exit_code == 0
    assert _cli("compile", spec).exit_code == 0


def _world_spec(folder: Path, world, export: dict) -> Path:
    """A real cycle on the small world, as short as a run can be (four steps of the heads), exporting as
    ``export`` says. Its goal is one every finished run reaches and its tolerance wide: these tests are about
    what happens after a release, not about training one."""
    spec = write_world_spec(
        folder, world, method="unconstrained", tolerance=0.6, steps=4, warmup_steps=1, eval_every=2, checkpoint_every=2
    )
    data = yaml.safe_load(spec.read_text())
    data["model"]["freeze"] = ["image", "text"]  # only the heads train, on cached features: seconds, not tens
    data["certify"] = {"require": "preserved"}
    data["target"]["goal"] = {"min_improvement": -1.0}
    data["export"] = {"mlflow": export}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def test_safespec_run_exports_as_its_spec_says(store, small_world, tmp_path):
    spec = _world_spec(tmp_path, small_world, {"tracking_uri": store, "model_name": "world-m"})
    res = _cli("run", spec, "--quiet")
    result = _result(tmp_path / "run")
    assert result["verdict"] == "certified" and result["target"]["goal_met"], res.output
    assert res.exit_code == 0, res.output
    (logged,) = _runs(store, "world-m")
    assert logged.data.tags["safespec.digest"] == result["provenance"]["new_model"]["digest"]
    assert logged.data.params["export.mlflow.model_name"] == "world-m"
    for cap in result["capabilities"]:
        assert logged.data.metrics[f"capability/{cap['name']}/new_accuracy"] == pytest.approx(cap["new_accuracy"])
    (version,) = MlflowClient(store).search_model_versions("name = 'world-m'")
    assert version.run_id == logged.info.run_id and version.tags["safespec.verdict"] == "certified"
    client = MlflowClient(store)
    got = Path(client.download_artifacts(logged.info.run_id, "model", str(tmp_path / "dl")))
    assert safetensors_digest(got / "unconstrained.safetensors") == result["provenance"]["new_model"]["digest"]


def test_a_failed_export_after_a_run_keeps_the_run_and_exits_2(small_world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _world_spec(tmp_path, small_world, {"tracking_uri": f"http://127.0.0.1:{port}"})
    res = _cli("run", spec, "--quiet")
    run = tmp_path / "run"
    result = _result(run)
    line = _one_line(res)
    assert line.startswith(f"{run}: the run is complete (verdict {result['verdict']}; its outputs stay) but was not ")
    assert "Connection refused" in line and line.endswith(f"retry with: safespec export mlflow {run}")
    assert json.loads((run / "state.json").read_text())["state"] == "complete"
    assert (run / "report.html").is_file() and (run / "junit.xml").is_file()
    assert "dog" in res.stdout  # the summary is printed before the export


def test_a_run_that_exports_refuses_to_start_without_mlflow(small_world, tmp_path, monkeypatch):
    spec = _world_spec(tmp_path, small_world, {"tracking_uri": "sqlite:///mlflow.db"})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as on a machine without it: find_spec says None
    line = _one_line(_cli("run", spec, "--quiet"))
    assert line.endswith("pip install 'safespec[mlflow]'")
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone training
