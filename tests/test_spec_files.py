"""Valid specs: loading, path resolution, YAML 1.2 scalars, the compiler's expansion, the example specs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from safespec.cli import main
from safespec.plan import Plan, PlanError, compile_spec
from safespec.errors import SpecError
from safespec.spec import Spec
from safespec.plan import load_plan
from safespec.spec import load_spec, parse_spec, read_spec_data, spec_digest

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).parent / "specs"
EXAMPLES = sorted((ROOT / "specs").glob("*.yaml"))
SPLITS = ("protected", "target", "validation", "heldout")
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def _stand_in_data(spec: Spec) -> None:
    """Small stand-in manifests (and checkpoint) at the resolved paths ``spec`` names."""
    rows = "path,label,caption\n" + "".join(
        f"img/{i}.png,{c},a photo of a {c}\n" for i, c in enumerate(spec.classes.names[:5])
    )
    for split in SPLITS:
        p = getattr(spec.data, split)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rows)
    if spec.model.checkpoint is not None:
        spec.model.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        spec.model.checkpoint.write_bytes(b"stand-in, never loaded here")


def _copy_example(tmp_path: Path, name: str) -> Path:
    """The example spec copied into tmp_path/specs/ with stand-in data where its relative paths lead."""
    dst = tmp_path / "specs" / name
    dst.parent.mkdir(parents=True)
    shutil.copy(ROOT / "specs" / name, dst)
    _stand_in_data(load_spec(dst, check_files=False))
    return dst


# -------------------------------------------------------------------------------------------- good.yaml
def test_good_spec_loads_with_resolved_absolute_paths():
    spec = load_spec(SPECS / "good.yaml")
    assert spec.name == "good-example"
    for split in SPLITS:
        p = getattr(spec.data, split)
        assert p.is_absolute() and p.is_file()
        assert p.resolve() == (SPECS / "data" / f"{split}.csv").resolve()
    assert spec.optimize.lr == pytest.approx(1e-5)  # '1e-5' is a number (YAML 1.2), not a string
    assert str(spec.report.dir) == "out/run"  # report.dir stays relative to the working directory


def test_load_spec_without_file_checks_accepts_missing_data(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text((SPECS / "good.yaml").read_text())
    with pytest.raises(SpecError):
        load_spec(path)
    spec = load_spec(path, check_files=False)
    assert spec.data.heldout == tmp_path / "data" / "heldout.csv"


def test_data_split_may_be_a_folder(tmp_path: Path):
    shutil.copytree(SPECS / "data", tmp_path / "data")
    (tmp_path / "data" / "heldout").mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text((SPECS / "good.yaml").read_text().replace("data/heldout.csv", "data/heldout"))
    assert load_spec(path).data.heldout.is_dir()


def test_compile_expands_and_defaults():
    spec, plan = load_plan(SPECS / "good.yaml")
    assert isinstance(plan, Plan)
    assert plan.classes == ("cat", "dog", "horse")
    assert [(c.name, c.classes, c.class_indices, c.tolerance, c.confidence) for c in plan.constraints] == [
        ("cat", ("cat",), (0,), 0.03, 0.95),  # confidence defaults to certify.confidence
        ("farm", ("horse",), (2,), 0.05, 0.9),
    ]
    assert plan.objective.target_class == "dog" and plan.objective.target_index == 1
    assert plan.objective.min_improvement == 0.0  # the default goal: no worse than before
    assert plan.protected_indices == (0, 2)
    assert plan.data.heldout == str(spec.data.heldout)
    with pytest.raises(Exception):
        plan.name = "changed"  # frozen


def test_each_expands_others_into_one_constraint_per_class():
    text = (SPECS / "good.yaml").read_text()
    head, _, tail = text.partition("protect:\n")
    _, _, tail = tail.partition("target:\n")
    text = head + "protect:\n  - name: kept\n    classes: others\n    each: true\n    tolerance: 0.02\ntarget:\n" + tail
    spec = parse_spec(text)
    plan = compile_spec(spec)
    assert [c.name for c in plan.constraints] == ["kept/cat", "kept/horse"]
    assert [c.classes for c in plan.constraints] == [("cat",), ("horse",)]
    # without each: one capability covering both classes
    plan = compile_spec(parse_spec(text.replace("    each: true\n", "")))
    assert [(c.name, c.classes) for c in plan.constraints] == [("kept", ("cat", "horse"))]


def test_compile_rejects_a_frozen_model_with_nothing_to_train():
    text = (
        (SPECS / "good.yaml")
        .read_text()
        .replace(
            "  pretrained: openai\n", "  pretrained: openai\n  freeze: [image, text]\n  heads:\n    enabled: false\n"
        )
    )
    with pytest.raises(PlanError) as info:
        compile_spec(parse_spec(text))
    assert info.value.field == "model.freeze"


def test_yaml_12_scalars():
    """Class names like 'no' and 'on' stay strings; only true/false are booleans; 1e-4 is a number."""
    text = (SPECS / "good.yaml").read_text().replace("[cat, dog, horse]", "[no, dog, on]")
    text = text.replace("  - classes: [cat]", "  - classes: [no]").replace("classes: [horse]", "classes: [on]")
    spec = parse_spec(text)
    assert spec.classes.names == ["no", "dog", "on"]


def test_bom_is_accepted(tmp_path: Path):
    shutil.copytree(SPECS / "data", tmp_path / "data")
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (SPECS / "good.yaml").read_bytes())
    assert load_spec(path).name == "good-example"


def test_parse_spec_reports_the_given_name():
    with pytest.raises(SpecError) as info:
        parse_spec("safespec: 1\nname: x\n", filename="embedded.yaml")
    assert all(line.startswith("embedded.yaml:") for line in info.value.lines)


def test_spec_digest_is_sha256_of_the_bytes(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"safespec: 1\n")
    assert spec_digest(path) == "sha256:" + hashlib.sha256(b"safespec: 1\n").hexdigest()
    path.write_bytes(b"safespec: 1\n# changed\n")
    assert spec_digest(path) == "sha256:" + hashlib.sha256(b"safespec: 1\n# changed\n").hexdigest()


# ------------------------------------------------------------------------------------------- examples
def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "bdd100k-weather.yaml", "bdd100k-scene.yaml", "places365.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates_without_data(path: Path):
    spec, plan = load_plan(path, check_files=False)
    assert plan.name == path.stem
    assert plan.objective.target_class not in {c for k in plan.constraints for c in k.classes}


def test_demo_spec():
    spec, plan = load_plan(ROOT / "specs" / "demo.yaml", check_files=False)
    assert list(plan.classes) == ANIMALS
    assert plan.objective.target_class == "dog"
    assert [c.name for c in plan.constraints] == [a for a in ANIMALS if a != "dog"]
    assert all(c.tolerance == 0.03 and c.confidence == 0.95 and len(c.classes) == 1 for c in plan.constraints)
    assert plan.model.arch == "safespec-mini-vit" and plan.model.rank == 8
    assert plan.model.pretrained is None
    assert Path(plan.model.checkpoint) == ROOT / "out" / "world" / "models" / "v1.safetensors"
    for split in SPLITS:
        assert Path(getattr(plan.data, split)) == ROOT / "out" / "world" / f"{split}.csv"
    assert plan.optimizer.method == "lagrangian" and plan.report_dir == "out/demo"


@pytest.mark.parametrize(
    "name, target, protected, beta, per_step",
    [
        ("bdd100k-weather.yaml", "foggy", ["clear", "overcast", "snowy", "rainy", "partly cloudy"], 100, 5),
        ("bdd100k-scene.yaml", "tunnel", ["highway", "residential area", "city street", "parking lot"], 100, 4),
    ],
)
def test_bdd100k_specs_validate_with_stand_in_data(tmp_path, name, target, protected, beta, per_step):
    path = _copy_example(tmp_path, name)
    spec, plan = load_plan(path)  # data checks on: the stand-in manifests exist
    assert plan.objective.target_class == target
    assert [c.name for c in plan.constraints] == protected
    assert plan.model.arch == "ViT-B-16" and plan.model.pretrained == "openai" and plan.model.rank == 32
    o = plan.optimizer
    assert (
        o.lr,
        o.weight_decay,
        o.warmup_steps,
        o.batch.target,
        o.penalty.beta,
        o.gamma,
        o.constraint_tau,
        o.temperature,
        o.batch.protected_classes,
    ) == (1e-6, 0.1, 500, 256, beta, 0.8, 0.05, 0.05, per_step)
    assert Path(plan.data.protected).is_file()


def test_places365_spec_validates_with_stand_in_data(tmp_path):
    path = _copy_example(tmp_path, "places365.yaml")
    spec, plan = load_plan(path)
    assert len(plan.classes) == 365 and len(set(plan.classes)) == 365
    assert plan.classes[126] == "dressing room"  # the index of categories_places365.txt
    assert plan.objective.target_class == "dressing room"
    assert len(plan.constraints) == 364 and "dressing room" not in {c.name for c in plan.constraints}
    o = plan.optimizer
    assert (o.penalty.beta, o.batch.protected_classes, o.batch.per_class) == (1000, 240, 2)


def test_example_without_its_data_names_the_paths_tried(tmp_path):
    dst = tmp_path / "specs" / "bdd100k-weather.yaml"
    dst.parent.mkdir()
    shutil.copy(ROOT / "specs" / "bdd100k-weather.yaml", dst)
    with pytest.raises(SpecError) as info:
        load_spec(dst)
    assert len(info.value.lines) == 4
    assert str(tmp_path / "specs" / "data" / "bdd100k-weather" / "heldout.csv") in info.value.lines[-1]


def test_read_spec_data_is_plain_data():
    data = read_spec_data(ROOT / "specs" / "demo.yaml")
    assert data["optimize"]["lr"] == pytest.approx(1e-4)
    assert json.loads(json.dumps(data)) == data


def test_validate_command_accepts_examples_with_stand_in_data(tmp_path):
    paths = [str(_copy_example(tmp_path / n, n)) for n in ("bdd100k-weather.yaml", "bdd100k-scene.yaml")]
    result = CliRunner().invoke(main, ["validate", *paths])
    assert result.exit_code == 0, result.output
    assert [line.split(": ok")[0] for line in result.stdout.splitlines()] == paths


def test_absolute_data_paths_are_kept_as_they_are(tmp_path):
    """Regression: resolving relative paths must leave absolute ones untouched (not drop them)."""
    from safespec.spec import Spec

    data = {k: str(tmp_path / f"{k}.csv") for k in ("protected", "target", "validation", "heldout")}
    spec = Spec.model_validate(
        {
            "safespec": 1,
            "name": "abs",
            "model": {"arch": "x", "checkpoint": str(tmp_path / "m.pt")},
            "classes": {"names": ["a", "b"]},
            "data": data,
            "protect": [{"classes": ["a"], "tolerance": 0.03}],
            "target": {"class": "b"},
        }
    )
    resolved = spec.resolve(tmp_path / "elsewhere")
    assert {k: str(getattr(resolved.data, k)) for k in data} == data
    assert str(resolved.model.checkpoint) == str(tmp_path / "m.pt")
