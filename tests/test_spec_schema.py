"""The JSON Schema that ``safespec schema`` prints: valid, complete, and agreeing with the pydantic models.

The ``jsonschema`` package is not a dependency, so the examples are checked with the small validator
below. It implements every keyword the schema uses and fails on any keyword it does not know, so a
schema change cannot slip past it unchecked.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from safespec.cli import main
from safespec.spec import Spec, json_schema
from safespec.spec import read_spec_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "specs").glob("*.yaml")) + [Path(__file__).parent / "specs" / "good.yaml"]

_ANNOTATIONS = {"$schema", "$defs", "title", "description", "default", "format", "examples"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v) and v.is_integer()
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def schema_errors(value: Any, schema: dict, root: dict, path: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (JSON Schema 2020-12, the subset pydantic emits)."""
    errs: list[str] = []
    for key, want in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            assert want.startswith("#/$defs/"), want
            errs += schema_errors(value, root["$defs"][want.split("/")[-1]], root, path)
        elif key == "type":
            if not _TYPES[want](value):
                errs.append(f"{path}: not of type {want}")
        elif key == "properties":
            if isinstance(value, dict):
                for k, sub in want.items():
                    if k in value:
                        errs += schema_errors(value[k], sub, root, f"{path}.{k}")
        elif key == "required":
            if isinstance(value, dict):
                errs += [f"{path}: missing {k}" for k in want if k not in value]
        elif key == "additionalProperties":
            if isinstance(value, dict):
                extra = [k for k in value if k not in schema.get("properties", {})]
                if want is False:
                    errs += [f"{path}: unexpected {k}" for k in extra]
                elif isinstance(want, dict):
                    for k in extra:
                        errs += schema_errors(value[k], want, root, f"{path}.{k}")
        elif key == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    errs += schema_errors(item, want, root, f"{path}[{i}]")
        elif key == "minItems":
            if isinstance(value, list) and len(value) < want:
                errs.append(f"{path}: fewer than {want} items")
        elif key == "minLength":
            if isinstance(value, str) and len(value) < want:
                errs.append(f"{path}: shorter than {want}")
        elif key == "pattern":
            if isinstance(value, str) and not re.search(want, value):
                errs.append(f"{path}: does not match {want}")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if _TYPES["number"](value):
                ok = {
                    "minimum": value >= want,
                    "maximum": value <= want,
                    "exclusiveMinimum": value > want,
                    "exclusiveMaximum": value < want,
                }[key]
                if not ok:
                    errs.append(f"{path}: violates {key} {want}")
        elif key == "enum":
            if value not in want:
                errs.append(f"{path}: not one of {want}")
        elif key == "const":
            if value != want or type(value) is bool and type(want) is not bool:
                errs.append(f"{path}: not {want!r}")
        elif key == "anyOf":
            if all(schema_errors(value, sub, root, path) for sub in want):
                errs.append(f"{path}: matches none of anyOf")
        else:
            raise AssertionError(f"the schema uses keyword {key!r}, which this validator does not check")
    return errs


@pytest.fixture(scope="module")
def printed_schema() -> dict:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_schema_is_a_2020_12_schema_of_the_spec(printed_schema):
    assert printed_schema == json_schema()
    assert printed_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert printed_schema["type"] == "object" and printed_schema["additionalProperties"] is False
    assert set(printed_schema["required"]) == {"safespec", "name", "model", "classes", "data", "protect", "target"}
    assert printed_schema["properties"]["safespec"]["const"] == 1
    # the YAML spellings, not Python's
    assert "class" in printed_schema["$defs"]["TargetSpec"]["properties"]
    assert "wise-ft" in printed_schema["$defs"]["OptimizeSpec"]["properties"]


def test_every_field_is_described(printed_schema):
    """Descriptions are what an editor shows on hover; a field without one is a gap in the docs."""
    missing = []
    for owner in [printed_schema, *printed_schema["$defs"].values()]:
        missing += [k for k, sub in owner.get("properties", {}).items() if not sub.get("description")]
    assert missing == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate_against_the_schema_and_the_models(path, printed_schema):
    data = read_spec_data(path)
    assert schema_errors(data, printed_schema, printed_schema) == []
    Spec.model_validate(data)


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda d: d.update(colour="red"), "$: unexpected colour"),
        (lambda d: d["optimize"].update(steps="many"), "$.optimize.steps: not of type integer"),
        (lambda d: d["protect"][0].update(tolerance=1.5), "$.protect[0].tolerance: violates maximum 1"),
        (lambda d: d.update(safespec=2), "$.safespec: not 1"),
        (lambda d: d["model"].pop("arch"), "$.model: missing arch"),
        (lambda d: d["optimize"].update(method="penalti"), "$.optimize.method: not one of"),
        (lambda d: d["protect"][0].update(classes=7), "$.protect[0].classes: matches none of anyOf"),
    ],
)
def test_the_checker_rejects_what_the_models_reject(edit, error, printed_schema):
    """The schema check above is not vacuous: broken specs fail it, as they fail pydantic."""
    data = read_spec_data(ROOT / "specs" / "demo.yaml")
    edit(data)
    errors = schema_errors(data, printed_schema, printed_schema)
    assert any(e.startswith(error) for e in errors), errors
    with pytest.raises(Exception):
        Spec.model_validate(data)


def test_committed_schema_file_is_current(printed_schema):
    """specs/safespec.schema.json is what the examples' modelines point editors at."""
    committed = json.loads((ROOT / "specs" / "safespec.schema.json").read_text())
    assert committed == printed_schema, "regenerate: safespec schema --output specs/safespec.schema.json"


def test_schema_output_file(tmp_path: Path):
    out = tmp_path / "sub" / "schema.json"
    result = CliRunner().invoke(main, ["schema", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json_schema()
    assert result.stdout == ""


def test_docs_cover_every_key():
    """docs/spec.md is the reference: every key of the language appears in it."""
    text = (ROOT / "docs" / "spec.md").read_text()
    schema = json_schema()
    keys = set(schema["properties"])
    for d in schema["$defs"].values():
        keys |= set(d.get("properties", {}))
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert missing == []


def test_docs_full_examples_validate(tmp_path: Path):
    """Every complete spec in docs/spec.md (a yaml block that starts with 'safespec:') is valid."""
    from safespec.plan import load_plan

    text = (ROOT / "docs" / "spec.md").read_text()
    blocks = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
        if b.lstrip().startswith(("safespec:", "#")) and "\nsafespec:" in "\n" + b
    ]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"doc{i}.yaml"
        path.write_text(block)
        load_plan(path, check_files=False)
