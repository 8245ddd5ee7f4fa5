"""The command line: exit codes, the shared error policy, init, compile, --version, and a light import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from safespec import __version__
from safespec.cli import SafespecGroup, main
from safespec.errors import DataError
from safespec.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).parent / "specs"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------------------------ basic commands
def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"safespec {__version__}"


@pytest.mark.parametrize("args", [[], ["validate"], ["schema"], ["init"], ["compile"]])
def test_help_everywhere(args):
    result = run(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_validate_ok_line():
    result = run("validate", str(SPECS / "good.yaml"))
    assert result.exit_code == 0, result.output
    assert (
        result.stdout
        == f"{SPECS / 'good.yaml'}: ok (3 classes, target 'dog', 2 protected capabilities, method penalty)\n"
    )
    assert result.stderr == ""


def test_validate_several_reports_each_and_fails_if_any_fails():
    bad = SPECS / "bad" / "tolerance-above-one.yaml"
    result = run("validate", str(SPECS / "good.yaml"), str(bad), str(SPECS / "good.yaml"))
    assert result.exit_code == 2
    assert result.stdout.count(": ok (") == 2
    assert result.stderr.splitlines() == [f"{bad}:20:5: protect[1].tolerance: must be between 0 and 1 (got 1.5)"]


def test_validate_no_data_check():
    missing = SPECS / "bad" / "missing-data-file.yaml"
    assert run("validate", str(missing)).exit_code == 2
    result = run("validate", "--no-data-check", str(missing))
    assert result.exit_code == 0, result.output


def test_compile_prints_the_plan_as_json():
    result = run("compile", "--no-data-check", str(ROOT / "specs" / "demo.yaml"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["objective"]["target_class"] == "dog"
    assert len(plan["constraints"]) == 9
    assert {c["name"] for c in plan["constraints"]} == set(plan["classes"]) - {"dog"}
    assert all(c["tolerance"] == 0.03 and c["confidence"] == 0.95 for c in plan["constraints"])
    assert plan["optimizer"]["steps"] == 300


def test_compile_error_is_located():
    bad = SPECS / "bad" / "plan-too-many-protected-per-step.yaml"
    result = run("compile", str(bad))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"{bad}:30:5: optimize.batch.protected_classes: ")


def test_usage_errors_exit_2():
    assert run("validate").exit_code == 2  # missing argument
    assert run("no-such-command").exit_code == 2
    assert run("schema", "--bogus").exit_code == 2


# -------------------------------------------------------------------------------------------- init
def test_init_writes_a_spec_that_validates_once_its_data_exist(tmp_path: Path):
    path = tmp_path / "release.yaml"
    result = run("init", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_text().count("\n# ") > 5  # commented

    result = run("validate", str(path))  # the data are not there yet
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 4 and "data.protected: not found" in result.stderr

    shutil.copytree(SPECS / "data", tmp_path / "data")
    result = run("validate", str(path))
    assert result.exit_code == 0, result.output
    assert load_spec(path).name == "release"


def test_init_refuses_to_overwrite(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text("mine\n")
    result = run("init", str(path))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{path}: already exists; use --force to overwrite it"
    assert path.read_text() == "mine\n"
    assert run("init", "--force", str(path)).exit_code == 0
    assert path.read_text().startswith("# A safespec release spec")


def test_init_into_a_folder_and_with_a_name(tmp_path: Path):
    result = run("init", "--name", "cycle-7", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert load_spec(tmp_path / "spec.yaml", check_files=False).name == "cycle-7"
    assert run("init", "--force", "--name", "bad name", str(tmp_path)).exit_code == 2


def test_init_default_path_is_spec_yaml(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("init").exit_code == 0
    assert (tmp_path / "spec.yaml").is_file()


# ------------------------------------------------------------------------------ shared error policy
@pytest.fixture()
def probe() -> click.Group:
    """A group with the same policy as `safespec`, and commands that fail in every way."""

    @click.group(cls=SafespecGroup)
    def cli() -> None:
        pass

    @cli.command()
    def user_error() -> None:
        raise DataError("data/x.csv:row 3: label 'cow' is not a class")

    @cli.command()
    def bug() -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    @cli.command()
    def interrupt() -> None:
        raise KeyboardInterrupt

    @cli.command()
    def not_certified() -> int:
        return 1

    @cli.command()
    def usage() -> None:
        raise click.ClickException("generic click failure")

    return cli


def test_user_error_is_one_line_exit_2(probe):
    result = CliRunner().invoke(probe, ["user-error"])
    assert result.exit_code == 2
    assert result.stderr == "data/x.csv:row 3: label 'cow' is not a class\n"
    assert "Traceback" not in result.output


def test_internal_error_is_one_line_with_a_hint(probe, monkeypatch):
    monkeypatch.delenv("SAFESPEC_DEBUG", raising=False)
    result = CliRunner().invoke(probe, ["bug"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("safespec: internal error: ZeroDivisionError: division by zero")
    assert "SAFESPEC_DEBUG=1" in lines[0]


def test_debug_shows_the_traceback(probe, monkeypatch):
    monkeypatch.setenv("SAFESPEC_DEBUG", "1")
    result = CliRunner().invoke(probe, ["bug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_interrupt_exits_130(probe):
    result = CliRunner().invoke(probe, ["interrupt"])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "safespec: interrupted"


def test_a_command_chooses_its_exit_code(probe):
    assert CliRunner().invoke(probe, ["not-certified"]).exit_code == 1


def test_click_exceptions_never_exit_1(probe):
    """Exit 1 means 'not certified'; click's own failures must not be mistaken for it."""
    result = CliRunner().invoke(probe, ["usage"])
    assert result.exit_code == 2
    assert "generic click failure" in result.stderr


# ------------------------------------------------------------------------------------- subprocesses
def test_python_m_safespec_and_no_torch_on_import(tmp_path: Path):
    """`python -m safespec` works, and the CLI's import and validation never load torch or open_clip."""
    code = (
        "import sys, safespec.cli\n"
        "from click.testing import CliRunner\n"
        f"r = CliRunner().invoke(safespec.cli.main, ['validate', {str(SPECS / 'good.yaml')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision', 'numpy', 'scipy') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "heavy: []"

    out = subprocess.run(
        [sys.executable, "-m", "safespec", "validate", str(SPECS / "bad" / "wrong-version.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith(f"{SPECS / 'bad' / 'wrong-version.yaml'}:2:1: safespec: unsupported")
    assert "Traceback" not in out.stderr
