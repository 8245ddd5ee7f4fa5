"""The release tooling around the CLI: the pre-commit hook definitions, run by pre-commit itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / ".pre-commit-hooks.yaml"


def _hooks() -> dict[str, dict]:
    return {h["id"]: h for h in yaml.safe_load(HOOKS.read_text())}


def test_both_hooks_run_the_same_check():
    hooks = _hooks()
    assert set(hooks) == {"safespec-validate", "safespec-validate-isolated"}
    system, isolated = hooks["safespec-validate"], hooks["safespec-validate-isolated"]
    assert system["language"] == "system" and isolated["language"] == "python"
    for key in ("entry", "args", "files", "types"):
        assert system[key] == isolated[key], key
    # the entry is the console script the package installs
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get(system["entry"].split()[0]) == "safespec.cli:main"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="pre-commit needs the hooks' repository as a git clone")
def test_pre_commit_runs_the_hook_on_spec_files(tmp_path):
    """`pre-commit try-repo` on this repository: a valid spec passes, a bad one fails with its located line,
    and a YAML file outside specs/ is not a spec and is left alone."""
    pre_commit = shutil.which("pre-commit", path=str(Path(sys.executable).parent))
    assert pre_commit, "pre-commit is a dev dependency (make test installs it)"
    repo = tmp_path / "project"
    (repo / "specs").mkdir(parents=True)
    good = (ROOT / "specs" / "demo.yaml").read_text()
    (repo / "specs" / "good.yaml").write_text(good)
    assert "  confidence: 0.95\n" in good
    (repo / "specs" / "bad.yaml").write_text(good.replace("  confidence: 0.95\n", "  confidence: 1.5\n"))
    (repo / "config.yaml").write_text("not: [a, spec\n")  # not even YAML: it must not be handed to the hook
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "GIT_CONFIG_GLOBAL": os.devnull,
    }

    def hook(*files: str) -> subprocess.CompletedProcess:
        cmd = [pre_commit, "try-repo", str(ROOT), "safespec-validate", "--files", *files]
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)

    ok = hook("specs/good.yaml", "config.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "safespec validate" in ok.stdout and "Passed" in ok.stdout

    bad = hook("specs/good.yaml", "specs/bad.yaml")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "exit code: 2" in bad.stdout
    assert "specs/bad.yaml:" in bad.stdout and "certify.confidence" in bad.stdout
    assert "specs/good.yaml: ok" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr
