"""The import contract between stages, read from the source (every import counts, lazy ones included):
the spec language knows nothing of torch, the certificate never depends on how a model was trained, the
report renders without models, torch or training, and nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "safespec"


def _imports(module: str) -> set[str]:
    """What this module imports: sibling modules by their name, outside packages by their top name."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # from .x import y  /  from . import x
                out.update([name.split(".")[0]] if name else [a.name for a in node.names])
            elif name.startswith("safespec."):
                out.add(name.split(".")[1])
            else:
                out.add(name.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


MODULES = {p.stem for p in PKG.glob("*.py")}


def _reach(module: str) -> tuple[set[str], set[str]]:
    """(sibling modules reached, outside packages imported along the way) from ``module``."""
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
    return seen, outside


@pytest.mark.parametrize("module", ["spec", "specfile", "compile"])
def test_the_spec_stage_imports_no_torch(module):
    siblings, outside = _reach(module)
    assert not {"torch", "open_clip"} & outside, (module, sorted(outside))
    assert not {"model", "train", "evaluate", "data"} & siblings, (module, sorted(siblings))


@pytest.mark.parametrize("module", ["certify", "stats", "selection"])
def test_the_certificate_never_depends_on_training(module):
    siblings, outside = _reach(module)
    assert not {"train", "model", "runner"} & siblings and "torch" not in outside, (module, sorted(siblings))


@pytest.mark.parametrize("module", ["report", "report_charts"])
def test_the_report_needs_no_model_torch_or_training(module):
    siblings, outside = _reach(module)
    assert not {"model", "train", "evaluate", "runner"} & siblings and "torch" not in outside, (module, sorted(siblings))


def test_nothing_imports_the_cli():
    importers = sorted(m for m in MODULES - {"cli", "__main__"} if "cli" in _imports(m))
    assert importers == []


def test_the_contract_checker_sees_lazy_imports():
    """The checker must see an import inside a function (a lazy import is still a dependency)."""
    siblings, _ = _reach("runner")
    assert {"train", "certify", "model"} <= siblings
