"""The ``safespec`` command line.

Thin on purpose: commands parse arguments and call the library. Error handling lives in one place,
:class:`SafespecGroup`, so that every command (also those added later) behaves the same way:

- a :class:`~safespec.errors.SafespecError` prints its lines on stderr and exits 2, no traceback;
- click usage errors exit 2 (exit 1 is reserved for "not certified");
- anything unexpected prints one ``safespec: internal error: ...`` line and exits 2
  (``SAFESPEC_DEBUG=1`` shows the traceback);
- Ctrl-C prints one line and exits 130.

A command may ``return`` an int to choose its exit code (e.g. 1 for "not certified").

Importing this module must stay light (no torch): commands that need the training stack import it
inside their function body.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import SafespecError, SpecError, atomic_write_text
from .lineage import Registry
from .lineage.describe import list_text, show_text
from .plan import load_plan
from .report import load_run, render_report, summary_text
from .result import parse_result
from .spec import METHODS, STARTER_DATA, json_schema, load_spec, parse_spec, starter_spec

EXIT_OK, EXIT_NOT_CERTIFIED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _debug() -> bool:
    return os.environ.get("SAFESPEC_DEBUG", "").strip() not in ("", "0", "false", "no")


def report_exception(exc: BaseException) -> int:
    """Print ``exc`` the way a user should see it and return the exit code it stands for."""
    if isinstance(exc, SafespecError):
        if _debug():
            traceback.print_exception(exc)
        for line in str(exc).splitlines() or [type(exc).__name__]:
            click.echo(line, err=True)
        return int(getattr(exc, "exit_code", EXIT_ERROR)) or EXIT_ERROR
    if (isinstance(exc, click.exceptions.Abort) and isinstance(exc.__context__, KeyboardInterrupt)) or isinstance(
        exc, KeyboardInterrupt
    ):
        click.echo("safespec: interrupted", err=True)
        return EXIT_INTERRUPTED
    if isinstance(exc, click.exceptions.Abort):
        click.echo("safespec: aborted", err=True)
        return EXIT_ERROR
    if isinstance(exc, click.ClickException):
        exc.show()
        return EXIT_ERROR
    if _debug():
        traceback.print_exception(exc)
    first = (str(exc).splitlines() or [""])[0]
    click.echo(
        f"safespec: internal error: {type(exc).__name__}: {first} (set SAFESPEC_DEBUG=1 to see the traceback)", err=True
    )
    return EXIT_ERROR


class SafespecGroup(click.Group):
    """A click group whose commands share one error policy (see the module docstring)."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name or "safespec", complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as exc:
            sys.exit(report_exception(exc))
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK)


@click.group(cls=SafespecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="safespec", message="%(prog)s %(version)s")
def main() -> None:
    """safespec: fine-tune a CLIP model so that a target class improves while protected classes keep
    their accuracy, then certify it on held-out data.

    Exit codes: 0 success (certified), 1 not certified, 2 bad input or error, 130 interrupted.
    """


_NO_DATA_CHECK = click.option(
    "--no-data-check",
    is_flag=True,
    help="Do not check that data files and the checkpoint exist (lint a spec whose data lives elsewhere).",
)


@main.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@_NO_DATA_CHECK
def validate(specs: tuple[str, ...], no_data_check: bool) -> int:
    """Check spec files: syntax, schema, cross-field rules, data files and the plan.

    Prints one 'ok' line per valid spec and one line per problem (FILE:LINE:COL: field: message)."""

    failed = False
    for path in specs:
        try:
            _, plan = load_plan(path, check_files=not no_data_check)
        except SpecError as e:
            failed = True
            for line in e.lines:
                click.echo(line, err=True)
            continue
        click.echo(
            f"{path}: ok ({len(plan.classes)} classes, target {plan.objective.target_class!r}, "
            f"{len(plan.constraints)} protected capabilit{'y' if len(plan.constraints) == 1 else 'ies'}, "
            f"method {plan.optimizer.method})"
        )
    return EXIT_ERROR if failed else EXIT_OK


@main.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the schema to this file instead of standard output.",
)
def schema(output: str | None) -> None:
    """Print the JSON Schema of the spec language (for editors and linters; see docs/spec.md)."""

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    _write(Path(output), text)
    click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("path", required=False, default="spec.yaml", type=click.Path(dir_okay=True))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--name", default=None, help="The spec's name (default: from the file name).")
def init(path: str, force: bool, name: str | None) -> None:
    """Write a commented starter spec to PATH (default spec.yaml; a folder gets spec.yaml inside)."""

    target = Path(path)
    if target.is_dir():
        target = target / "spec.yaml"
    if target.exists() and not force:
        raise SafespecError(f"{target}: already exists; use --force to overwrite it")
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", target.stem).strip("-._") or "my-cycle"
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise click.BadParameter(
            "use letters, digits, '.', '_' and '-', starting with a letter or digit", param_hint="'--name'"
        )
    _write(target, starter_spec(name))
    click.echo(f"wrote {target}")
    click.echo(
        f"next: put your manifests at {', '.join(STARTER_DATA)} (relative to the spec), "
        f"edit the classes, then run: safespec validate {target}"
    )


@main.command("compile")
@click.argument("spec", metavar="SPEC")
@_NO_DATA_CHECK
def compile_cmd(spec: str, no_data_check: bool) -> None:
    """Print the plan the later stages run (JSON): every shorthand expanded, paths resolved."""

    _, plan = load_plan(spec, check_files=not no_data_check)
    click.echo(plan.to_json())


# --------------------------------------------------------------------------------- the release cycle
_QUIET = click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar; only the summary (also implied by CI=1 for the bar)."
)
_OUT = click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Run directory (default: the spec's report.dir)."
)


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: click.echo(f"safespec: {s}", err=True))


def _distributed(quiet: bool) -> bool:
    """Join torchrun's process group when launched by it. Returns whether this process logs: rank 0
    unless ``--quiet``; the other ranks stay silent (their lines would repeat rank 0's)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return not quiet
    from .distributed import setup  # torch: imported by the commands that train

    ctx = setup(log=_log(quiet))
    return ctx.is_main and not quiet


def _summarise(result: dict, show: bool = True) -> int:

    if show:
        click.echo(summary_text(result, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    return EXIT_OK if release_ok(result) else EXIT_NOT_CERTIFIED


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def release_ok(result: dict) -> bool:
    """The release gate (:attr:`safespec.result.Result.release_ok`); a result that does not parse is no
    release (fail closed)."""
    try:
        return parse_result(result).release_ok
    except ValueError:
        return False


@main.command()
@click.argument("spec", metavar="SPEC")
@click.option("--resume", is_flag=True, help="Continue from the training state saved in the run directory.")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=None,
    help="Override optimize.method (e.g. to certify a baseline).",
)
@_OUT
@_QUIET
def run(spec: str, resume: bool, method: str | None, out: str | None, quiet: bool) -> int:
    """Run the whole cycle: compile, train, select, certify, report.

    Exits 0 when every protected capability meets what the spec requires and the target reaches its goal,
    1 when not, 2 on bad input."""
    from .api import run_cycle  # torch and open_clip: only the commands that need them pay their import

    exports = load_spec(spec, check_files=False).export
    if exports is not None and _is_main():
        from .export import require_mlflow

        require_mlflow()  # before hours of training, not after
    talk = _distributed(quiet)
    result = run_cycle(
        spec, resume=resume, quiet=not talk, out=Path(out) if out else None, method=method, log=_log(not talk)
    )
    code = _summarise(result, show=_is_main())  # the summary is the result: printed even when quiet
    if exports is not None and _is_main():
        code = _export_after_run(result, Path(out) if out else None, code, _log(not talk))
    return code


def _export_after_run(result: dict, out: Path | None, code: int, log) -> int:
    """The spec's ``export.mlflow``, once the run directory is complete. A failed export leaves the run
    directory as it is (complete, with its own verdict) and exits 2 with one line; the export writes nothing
    that the run did not certify (docs/mlflow.md)."""
    from .export import export_mlflow

    spec = parse_spec(result["spec"]["text"], filename="result.json spec.text")  # the spec that ran
    run_dir = out or Path(spec.report.dir)
    try:
        done = export_mlflow(run_dir, log=log)
    except SafespecError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SafespecError(
            f"{run_dir}: the run is complete (verdict {result['verdict']}; its outputs stay) but was not exported "
            f"to MLflow: {first}; retry with: safespec export mlflow {run_dir}"
        ) from None
    for line in done.lines():
        log(line)
    return code


@main.command()
@click.argument("spec", metavar="SPEC")
@click.option(
    "--candidate",
    required=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint of the new model (.safetensors, or a weights-only torch file).",
)
@_OUT
@_QUIET
def verify(spec: str, candidate: str, out: str | None, quiet: bool) -> int:
    """Certify a model trained elsewhere against the spec's old model, without training."""
    from .api import verify_candidate  # torch and open_clip, as above

    talk = _distributed(quiet)
    result = verify_candidate(spec, candidate, out=Path(out) if out else None, log=_log(not talk))
    return _summarise(result, show=_is_main())  # the summary is the result: printed even when quiet


@main.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
def report(run_dir: str) -> int:
    """Re-render report.html and junit.xml from a run directory's result.json and trajectory."""

    written = render_report(Path(run_dir))
    for path in written.values():
        click.echo(f"wrote {path}", err=True)
    return _summarise(load_run(Path(run_dir)).result)


@main.command()
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="The demo spec (default: specs/demo.yaml of this checkout).",
)
@click.option(
    "--world",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the demo world lives (default: the folder of the spec's data manifests).",
)
@click.option(
    "--world-only", is_flag=True, help="Build (or check) the demo world and print v1's accuracies; no training."
)
@click.option(
    "--cycles",
    type=click.IntRange(1, 2),
    default=1,
    show_default=True,
    help="2: a lineage of two cycles, v1 -> v2 (dog) -> v3 (bird, dog kept), registered in out/demo-lineage/.",
)
@_QUIET
def demo(spec_path: str | None, world: str | None, world_only: bool, cycles: int, quiet: bool) -> int:
    """Build the embedded demo world once (Animal-MNIST + the old model v1) and run the demo cycle on it."""
    from .api import run_cycle  # torch and open_clip: only the commands that need them pay their import
    from .demo import build_world  # torch, as above

    spec_file = Path(spec_path) if spec_path else Path(__file__).resolve().parent.parent / "specs" / "demo.yaml"
    if not spec_file.is_file():
        raise SafespecError(f"{spec_file}: demo spec not found; pass --spec PATH")
    if cycles == 2:
        return _demo_lineage(spec_file, Path(world) if world else None, world_only, quiet)
    root = Path(world) if world else load_spec(spec_file, check_files=False).data.protected.parent
    w = build_world(root, progress=not quiet, log=_log(quiet))
    click.echo("old model v1, held-out accuracy per class:")
    for name, acc in w.v1_accuracy.items():
        click.echo(f"  {name:<10} {acc:.3f}")
    if world_only:
        return EXIT_OK
    result = run_cycle(spec_file, quiet=quiet, log=_log(quiet))
    code = _summarise(result)
    click.echo(f"report: {load_spec(spec_file, check_files=False).report.dir / 'report.html'}")
    if code != EXIT_OK:
        # the demo is a showcase, not a release gate: it ran to the end and says what it found
        click.echo("demo: the release gate would refuse this model (`safespec run` exits 1 here); the report says why")
    return EXIT_OK


def _demo_lineage(spec_file: Path, world: Path | None, world_only: bool, quiet: bool) -> int:
    """``demo --cycles 2``: the lineage world (built once), then a fresh lineage in out/demo-lineage/:
    cycle 1 (dog) and cycle 2 (bird)."""
    import shutil

    from .api import run_cycle
    from .demo import build_world
    from .demo.cycles import LINEAGE_WORLD, accuracy_table, lineage_specs

    second = spec_file.parent / "demo-cycle2.yaml"
    if not second.is_file():
        raise SafespecError(f"{second}: the second cycle's spec not found (it ships beside the demo spec)")
    spec2 = load_spec(second, check_files=False)
    assert spec2.lineage is not None  # the shipped spec names its lineage
    root = world or spec2.data.heldout.parent
    w = build_world(root, LINEAGE_WORLD, progress=not quiet, log=_log(quiet))
    click.echo("old model v1 of the lineage world (dog and bird starved), held-out accuracy per class:")
    for name, acc in w.v1_accuracy.items():
        click.echo(f"  {name:<10} {acc:.3f}")
    if world_only:
        return EXIT_OK
    out = Path(spec2.lineage.dir).parent
    shutil.rmtree(out / "registry", ignore_errors=True)  # each demo starts its own lineage from v1
    first, then = lineage_specs(spec_file, second, out)
    results = []
    for n, spec in enumerate((first, then), start=1):
        click.echo(f"demo: cycle {n} of 2 ({spec})")
        result = run_cycle(spec, quiet=quiet, log=_log(quiet))
        _summarise(result)
        results.append(result)
        if not (result.get("lineage") or {}).get("release"):
            click.echo(f"demo: cycle {n} was not registered ({result['lineage']['registration']}); the lineage stops")
            return EXIT_OK
    click.echo("held-out accuracy per class across the lineage (v1 = origin, v2 = release 1, v3 = release 2):")
    click.echo(f"  {'class':<10} {'v1':>6} {'v2':>6} {'v3':>6}")
    for cls, accs in accuracy_table(results[-1]):
        click.echo(f"  {cls:<10} " + " ".join(f"{a:6.3f}" if a is not None else "   n/a" for a in accs))
    for b in results[-1]["lineage"]["budgets"]:
        if b["capability"] == "dog":
            click.echo(f"dog's budget: {b['budget']:.0%}, used {b['used']:.1%}, left {b['left']:.1%} ({b['status']})")
    click.echo(f"registry: {out / 'registry'} (safespec lineage list {out / 'registry'})")
    click.echo(f"reports: {out / 'v2' / 'report.html'}, {out / 'v3' / 'report.html'}")
    return EXIT_OK


# --------------------------------------------------------------------------------- exports
@main.group("export")
def export_group() -> None:
    """Export a finished run directory to another system (docs/mlflow.md)."""


@export_group.command("mlflow")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI (default: the spec's export.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else MLflow's default).",
)
@click.option(
    "--experiment", default=None, help="MLflow experiment (default: the spec's, else the registered model's name)."
)
@click.option(
    "--model-name",
    default=None,
    help="Registered model a release becomes a version of (default: the spec's export.mlflow.model_name, else its name).",
)
def export_mlflow_cmd(run_dir: str, tracking_uri: str | None, experiment: str | None, model_name: str | None) -> int:
    """Log a finished run to MLflow (spec as parameters, certificate as metrics, report as artifacts) and
    register its model as a version only when it is a release: certified with its goal met (and, in a
    lineage, released by it).

    Exits 0 when the model is registered, 1 when the run was logged but is no release, 2 on error."""
    from .export import export_mlflow  # MLflow: imported only when an export runs

    if model_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name):
        raise click.BadParameter(
            "use letters, digits, '.', '_' and '-', starting with a letter or digit", param_hint="'--model-name'"
        )
    for value, hint in ((tracking_uri, "--tracking-uri"), (experiment, "--experiment")):
        if value is not None and not value.strip():
            raise click.BadParameter("must not be empty", param_hint=f"'{hint}'")
    done = export_mlflow(Path(run_dir), tracking_uri=tracking_uri, experiment=experiment, model_name=model_name)
    for line in done.lines():
        click.echo(line)
    return EXIT_OK if done.registered else EXIT_NOT_CERTIFIED


# --------------------------------------------------------------------------------- the lineage
@main.group()
def lineage() -> None:
    """The lineage registry of releases: list them, show one, verify every stored file.

    REGISTRY is the registry's folder, or a spec whose lineage.dir names it."""


def _registry(where: str) -> Registry:
    path = Path(where)
    if path.is_file():
        spec = load_spec(path, check_files=False)
        if spec.lineage is None:
            raise SafespecError(f"{path}: the spec has no lineage section (lineage: {{dir: ...}})")
        path = Path(spec.lineage.dir)
    elif not path.exists():
        raise SafespecError(f"{path}: no such lineage registry (a folder, or a spec whose lineage.dir names one)")
    return Registry.open(path)


_REGISTRY = click.argument("registry", metavar="REGISTRY")


@lineage.command("list")
@_REGISTRY
def lineage_list(registry: str) -> None:
    """The releases in order, oldest first."""
    click.echo(list_text(_registry(registry)))


@lineage.command("show")
@_REGISTRY
@click.argument("release", default="latest")
def lineage_show(registry: str, release: str) -> None:
    """One release in full (RELEASE: a number, 'latest', 'origin' or a digest prefix; default latest)."""
    reg = _registry(registry)
    click.echo(show_text(reg, reg.release(release)))


@lineage.command("verify")
@_REGISTRY
def lineage_verify(registry: str) -> int:
    """Re-hash every stored file and model, check the parent chain and every stored certificate.

    Exits 0 when the registry is intact, 1 on any mismatch (one line each)."""
    from safetensors.torch import load_file

    from .model import tensor_digest  # torch: the models' weights are re-hashed from their tensors

    reg = _registry(registry)
    problems = reg.verify(read_result=_release_problem, weights_digest=lambda p: tensor_digest(load_file(p)))
    for p in problems:
        click.echo(f"{reg.path}: {p}", err=True)
    if problems:
        click.echo(f"{reg.path}: {len(problems)} problem(s) in {len(reg.releases)} release(s)")
        return EXIT_NOT_CERTIFIED
    click.echo(f"{reg.path}: ok ({len(reg.releases)} release(s), every file and certificate intact)")
    return EXIT_OK


def _release_problem(result: dict) -> str | None:
    """Why a stored result.json is not a valid release: it does not parse (or contradicts its verdict), or
    it is not certified with its goal met."""
    try:
        parsed = parse_result(result)
    except ValueError as e:
        return str(e).splitlines()[0]
    return None if parsed.release_ok else f"not a release (verdict {parsed.verdict}, goal met {parsed.target.goal_met})"


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise SafespecError(f"{path}: cannot write: {e.strerror or e}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
