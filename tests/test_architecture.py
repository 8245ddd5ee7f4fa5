"""The import contract between stages, read from the source (every import counts, lazy ones included):
the spec language knows nothing of torch, the certificate never depends on how a model was trained, the
report renders without models, torch or training, and nothing imports the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "safespec"


def _module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name under safespec ('report.load'; a package is its
    __init__: 'report')."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = p
    return out


FILES = _module_files()
MODULES = set(FILES)


def _is_package(module: str) -> bool:
    return FILES[module].name == "__init__.py"


def _with_parents(module: str) -> set[str]:
    """Importing 'a.b.c' runs the packages 'a' and 'a.b' too."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES


def _imports(module: str) -> set[str]:
    """What this module imports: package modules by their dotted name, outside packages by their top name."""
    tree = ast.parse(FILES[module].read_text())
    package = module if _is_package(module) else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # from .x import y  /  from . import x  /  from ..x import y
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([name] if name else [])])
            elif name == "safespec" or name.startswith("safespec."):
                target = name.partition(".")[2]
            else:
                out.add(name.split(".")[0])
                continue
            found = set()
            if target in MODULES:
                found.add(target)
            for a in node.names:  # from package import submodule
                sub = f"{target}.{a.name}" if target else a.name
                if sub in MODULES:
                    found.add(sub)
            for f in found:
                out |= _with_parents(f)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("safespec."):
                    out |= _with_parents(a.name.partition(".")[2])
                else:
                    out.add(a.name.split(".")[0])
    out.discard(module)
    return out


def _stage(module: str) -> str:
    return module.split(".")[0]


def _reach(module: str) -> tuple[set[str], set[str]]:
    """(stages reached, outside packages imported along the way) from ``module``, its own stage excluded."""
    seen, outside, todo = set(), set(), [module]
    while todo:
        m = todo.pop()
        for d in _imports(m):
            if d in MODULES:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
            else:
                outside.add(d)
    return {_stage(m) for m in seen} - {_stage(module)}, outside


def _stage_modules(*stages: str) -> list[str]:
    return sorted(m for m in MODULES if _stage(m) in stages)


@pytest.mark.parametrize("module", [*_stage_modules("spec"), "plan"])
def test_the_spec_stage_imports_no_torch(module):
    siblings, outside = _reach(module)
    assert not {"torch", "open_clip", "mlflow"} & outside, (module, sorted(outside))
    assert not {"model", "train", "evaluate", "data"} & siblings, (module, sorted(siblings))


@pytest.mark.parametrize("module", _stage_modules("certify"))
def test_the_certificate_never_depends_on_training(module):
    siblings, outside = _reach(module)
    assert not {"train", "model", "runner"} & siblings and "torch" not in outside, (module, sorted(siblings))


@pytest.mark.parametrize("module", _stage_modules("report"))
def test_the_report_needs_no_model_torch_or_training(module):
    siblings, outside = _reach(module)
    assert not {"model", "train", "evaluate", "runner"} & siblings and "torch" not in outside, (
        module,
        sorted(siblings),
    )


@pytest.mark.parametrize("module", _stage_modules("export"))
def test_exports_read_the_run_directory_only(module):
    """An export reads result.json and the files beside it, as the report does: no model, torch or training."""
    siblings, outside = _reach(module)
    assert not {"model", "train", "evaluate", "runner", "data", "certify", "api"} & siblings, (module, sorted(siblings))
    assert not {"torch", "open_clip", "numpy", "scipy"} & outside, (module, sorted(outside))


def test_only_the_export_imports_mlflow():
    """MLflow is an optional dependency: the export imports it when it runs, and no other module at all."""
    importers = sorted(m for m in MODULES if _stage(m) != "export" and "mlflow" in _imports(m))
    assert importers == []
    assert "mlflow" in _reach("export.mlflow")[1]  # the checker sees the export's own (lazy) import


def test_the_typed_result_stands_alone():
    """result.py is the contract between certify and report: pydantic only, so any tool can read a result."""
    siblings, outside = _reach("result")
    assert siblings == set() and outside <= {"__future__", "collections", "json", "re", "sys", "typing", "pydantic"}, (
        sorted(siblings),
        sorted(outside),
    )


def test_the_cli_and_bench_reach_the_stages_through_the_public_api():
    """safespec.api is the stage API (load inputs, train, certify a candidate, write the run directory):
    the CLI and bench call it, not the runner behind it."""
    assert "runner" not in _imports("cli") and "api" in _imports("cli")
    offenders = []
    for path in sorted((PKG.parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "") == "safespec.runner":
                offenders.append(path.name)
    assert offenders == []


def test_nothing_imports_the_cli():
    importers = sorted(m for m in MODULES - {"cli", "__main__"} if "cli" in _imports(m))
    assert importers == []


def test_the_contract_checker_resolves_package_imports():
    """Relative imports inside a package, and a package's submodules, are seen as what they are."""
    assert {"report.load", "report.view"} <= _imports("report.html")
    assert "errors" in _imports("report.load")  # from ..errors import
    assert "report.write" in _imports("report")  # a package imports its own modules


def test_the_contract_checker_sees_lazy_imports():
    """The checker must see an import inside a function (a lazy import is still a dependency)."""
    siblings, _ = _reach("runner")
    assert {"train", "certify", "model"} <= siblings


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists the packages explicitly (templates/ is mapped in from the top of the repository): a
    new stage package left out of that list would be missing from an installed (non-editable) safespec."""
    text = (PKG.parent / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(safespec(?:\.[a-z_]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    packages = {"safespec" + ("." + m if m else "") for m in [""] + sorted(MODULES) if m == "" or _is_package(m)}
    assert packages <= listed, sorted(packages - listed)


def test_bench_uses_the_public_api_only():
    """bench measures what users run: it imports no private name (a leading underscore) from safespec."""
    private = []
    for path in sorted((PKG.parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safespec"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
                if any(part.startswith("_") for part in (node.module or "").split(".")):
                    private.append(f"{path.name}: {node.module}")
    assert private == []
