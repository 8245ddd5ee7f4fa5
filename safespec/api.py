"""The public stage API: what ``safespec run`` and ``safespec verify`` do, one stage at a time.

The CLI and bench call these, and so can a team's own release pipeline::

    inp = load_inputs(Path("spec.yaml"), log=print)           # spec -> plan, manifests, digests
    old = load_model(inp.plan.model, inp.plan.classes)        # the old model
    data = make_train_data(inp, old.preprocess)               # the training-side splits
    rd = RunDir(inp.plan.report_dir); rd.start("my pipeline")
    cand = train_candidate(inp, old, data, "lagrangian", rd=rd, cache=PredictionCache())
    cert = certify_candidate(inp, old, cand.model, cand.digest, cache=..., run_dir=rd.path, device=..., log=print)
    ...
    write_run(rd, result, log=print)                          # result.json (checked), report, state: complete

``run_cycle`` and ``verify_candidate`` compose them, failing closed: any error marks the run directory failed.
The names here are stable; the modules behind them may move.
"""

from __future__ import annotations

from .evaluate import PredictionCache
from .model import LoadedModel, load_model
from .result import Result, parse_result, validate_result
from .runner import (
    Candidate,
    Loaded,
    RunDir,
    certify_candidate,
    load_inputs,
    load_split,
    make_train_data,
    run_cycle,
    train_candidate,
    verify_candidate,
    write_run,
)

__all__ = [
    "Candidate",
    "Loaded",
    "LoadedModel",
    "PredictionCache",
    "Result",
    "RunDir",
    "certify_candidate",
    "load_inputs",
    "load_model",
    "load_split",
    "make_train_data",
    "parse_result",
    "run_cycle",
    "train_candidate",
    "validate_result",
    "verify_candidate",
    "write_run",
]
