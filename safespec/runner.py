"""The release cycle's stages: compile, train, select, certify, write the run directory, render the report.

The run directory (:mod:`safespec.rundir`) is written fail-closed. ``state.json`` says ``running`` first; stale results of an
earlier run are removed before any work starts; ``result.json`` and the report appear only after the
certificate exists; any failure or interrupt leaves ``state.json`` = ``failed`` with the reason and no
result or report at all. So nothing in a run directory can claim certification unless the whole
cycle finished.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .certify import certify, certify_budgets, confusion_matrix, paired_from_correct, stats
from .data import ImageBank, ViewBank, check_disjoint, decode_workers, read_manifest
from .distributed import context as dist_context
from .environment import versions
from .errors import RunError, atomic_write_json
from .evaluate import (
    IMAGE_CACHE_BYTES,
    PredictionCache,
    evaluate,
    feature_key,
    image_features,
    images_key,
    prediction_key,
    same_visual,
    visual_digest,
)
from .model import LoadedModel, build_class_tokens, load_model, preprocess_config, save_checkpoint, weights_digest
from .plan import Plan, load_plan
from .release import budget_block, check_parent, lineage_block, per_class_accuracy, registering
from .report import render_report
from .result import SCHEMA_VERSION, parse_result
from .rundir import RunDir, failure_reason, utc_now
from .train import Split, TrainData, Trainer, TrainOutcome

MAX_FLIP_THUMBNAILS = 8


# ----------------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    """Everything a run reads, loaded once."""

    spec: Any
    plan: Plan
    spec_path: Path
    spec_text: str
    spec_digest: str
    manifests: dict[str, Any]
    digests: dict[str, str]


def load_inputs(spec_path: Path, *, log: Callable[[str], None]) -> Loaded:
    spec, plan = load_plan(spec_path)
    manifests = {
        split: read_manifest(Path(getattr(plan.data, split)), plan.classes)
        for split in ("protected", "target", "validation", "heldout")
    }
    # the store and the target set may share images (negatives are drawn from the base training set);
    # the certificate's held-out split and the selection's validation split must share none with anything
    check_disjoint(
        manifests,
        pairs=[
            ("heldout", "validation"),
            ("heldout", "protected"),
            ("heldout", "target"),
            ("validation", "protected"),
            ("validation", "target"),
        ],
    )
    digests = {k: m.digest() for k, m in manifests.items()}
    raw = Path(spec_path).read_bytes()  # one read: the text the report shows is the text the digest names
    return Loaded(
        spec=spec,
        plan=plan,
        spec_path=spec_path,
        spec_text=raw.decode("utf-8"),
        spec_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        manifests=manifests,
        digests=digests,
    )


def make_train_data(inp: Loaded, preprocess):
    """The three training-side splits as the trainer sees them. Of the held-out split only its size per
    class goes along: selection predicts the certificate that split will give, never reads its images."""
    held = inp.manifests["heldout"]
    store = load_split(inp.manifests["protected"], preprocess, inp.digests["protected"])
    views = inp.plan.optimizer.store_views
    if views:  # the constraints also measure fixed augmented copies of the store (safespec.data.ViewBank)
        bank = ViewBank(store.bank, views, seed=inp.plan.optimizer.seed)
        store = Split(bank=bank, labels=bank.labels, digest=bank.digest(store.digest))
    target = load_split(inp.manifests["target"], preprocess, inp.digests["target"])
    tviews = inp.plan.optimizer.target_views
    if tviews:  # fixed augmented copies of the target set too, drawn apart from the store's
        tbank = ViewBank(target.bank, tviews, seed=inp.plan.optimizer.seed + 7919)
        captions = None if target.captions is None else list(target.captions) * (1 + tviews)
        target = Split(bank=tbank, labels=tbank.labels, digest=tbank.digest(target.digest), captions=captions)
    return TrainData(
        store=store,
        target=target,
        validation=load_split(inp.manifests["validation"], preprocess, inp.digests["validation"]),
        heldout_counts=np.bincount(held.labels, minlength=len(inp.plan.classes)),
    )


def load_split(manifest, preprocess, digest: str, *, bank: ImageBank | None = None):
    """One split as training and evaluation read it: its image bank (``bank``, if the caller has one),
    labels, digest and captions."""
    captions = [r.caption for r in manifest.records]
    return Split(
        bank=bank if bank is not None else ImageBank(manifest, preprocess, num_workers=decode_workers()),
        labels=manifest.labels,
        digest=digest,
        captions=captions if any(c for c in captions) else None,
    )


# ----------------------------------------------------------------------------------- certification
def held_out_split(inp: Loaded, old, cache: PredictionCache) -> Split:
    """The held-out split, its images decoded once per split digest and preprocessing: every verify of a
    candidate against the same split (a release pipeline's usual case) reads them back from the cache
    instead of decoding them again. A split too large to keep (``IMAGE_CACHE_BYTES``) is decoded each time,
    as it is under torchrun, where each rank decodes its own."""
    manifest, digest = inp.manifests["heldout"], inp.digests["heldout"]
    if dist_context().active:
        return load_split(manifest, old.preprocess, digest)
    key = images_key(digest, preprocess_config(old.model))
    images = cache.images(key, len(manifest))
    if images is not None:
        return load_split(manifest, old.preprocess, digest, bank=ImageBank(manifest, old.preprocess, images=images))
    held = load_split(manifest, old.preprocess, digest)
    t = held.bank.tensor
    if t is not None and t.numel() * t.element_size() <= IMAGE_CACHE_BYTES:
        cache.put_images(key, t)
    return held


def certify_candidate(
    inp: Loaded, old, new_model, new_digest: str, *, cache, run_dir: Path, device, log, thumbnails: bool = True
) -> dict[str, Any]:
    """Evaluate old and new on the held-out split (old cached by digest) and certify; returns the
    result fragment (certificate + per-class numbers + confusion + flips)."""
    plan = inp.plan
    held = held_out_split(inp, old, cache)
    tokens = build_class_tokens(old.tokenizer, plan.classes, plan.templates).to(device)
    tau = plan.optimizer.constraint_tau

    # a new model that kept the old image tower (model.freeze: [image]) is evaluated from the old
    # tower's held-out image features: one image pass serves both models, and later runs none. Both are
    # decided on first need: nothing is compared or hashed when both predictions are cached
    features: list = []

    def evaluate_(model):
        if not features:
            shared = same_visual(old.model, new_model)
            key = feature_key(visual_digest(old.model), held.digest, "fp32") if shared else None
            features.append(
                cache.features(key, lambda: image_features(old.model, held.bank, device=device)) if key else None
            )
        return evaluate(model, tokens, held.bank, held.labels, tau, device=device, features=features[0])

    def preds(model, digest):
        key = prediction_key(
            digest, held.digest, plan.classes, plan.templates, tau, heads=getattr(model, "heads", None) is not None
        )
        return cache.get_or_compute(key, lambda: evaluate_(model))

    log("evaluating the old model on the held-out split")
    p_old = preds(old.model, old.digest)
    log("evaluating the new model on the held-out split")
    p_new = preds(new_model, new_digest)
    cert = certify(plan, held.labels, p_old.preds, p_new.preds)
    ancestors = _ancestor_predictions(plan, old, p_old, preds, log) if plan.lineage is not None else []
    budget_caps = certify_budgets(plan, held.labels, [(k, p.preds) for k, p in ancestors], p_new.preds)
    cert = dataclasses.replace(cert, capabilities=cert.capabilities + budget_caps)
    out = cert.to_dict()
    accuracy = {k: p.correct for k, p in ancestors} | {"new": p_new.correct}
    if plan.lineage is not None:
        budgets = budget_block(plan, held.labels, accuracy, [c.to_dict() for c in budget_caps])
        out["lineage"] = lineage_block(plan, budgets, per_class_accuracy(plan, held.labels, accuracy))
    C = len(plan.classes)
    per_class = []
    for c, name in enumerate(plan.classes):
        m = held.labels == c
        o, n = p_old.correct[m], p_new.correct[m]
        t = paired_from_correct(o, n)
        per_class.append(
            {
                "class": name,
                "n": int(m.sum()),
                "old_accuracy": float(o.mean()) if m.any() else None,
                "new_accuracy": float(n.mean()) if m.any() else None,
                "old_loss": float(p_old.losses[m].mean()) if m.any() else None,
                "new_loss": float(p_new.losses[m].mean()) if m.any() else None,
                "negative_flips": t.negative_flips,
                "positive_flips": t.positive_flips,
            }
        )
    out["per_class"] = per_class
    out["confusion"] = {
        "old": confusion_matrix(held.labels, p_old.preds, C).tolist(),
        "new": confusion_matrix(held.labels, p_new.preds, C).tolist(),
    }
    out["flips"] = _flip_thumbnails(inp, p_old, p_new, run_dir) if thumbnails and dist_context().is_main else []
    return out


def _ancestor_predictions(plan: Plan, old, p_old, preds, log) -> list[tuple[str, Any]]:
    """Every ancestor's held-out predictions, origin first (cached by digest, so each ancestor is evaluated
    on a split once). The first cycle of a lineage has no ancestor yet: its old model, the origin-to-be."""
    lin = plan.lineage
    assert lin is not None
    if not lin.ancestors:
        return [("origin", p_old)]
    out = []
    for a in lin.ancestors:
        if a.digest == old.digest:
            out.append((a.label, p_old))
            continue
        log(f"evaluating the lineage's {a.label} on the held-out split")
        anc = load_model(dataclasses.replace(plan.model, pretrained=None, checkpoint=a.model_path), plan.classes)
        if anc.digest != a.digest:
            raise RunError(
                f"lineage.dir: {a.model_path}: its weights digest is {anc.digest}, not {a.label}'s {a.digest}"
            )
        out.append((a.label, preds(anc.model, a.digest)))
        del anc
    return out


def _flip_thumbnails(inp: Loaded, p_old, p_new, run_dir: Path) -> list[dict]:
    """Copy a few negatively flipped held-out images of protected classes into flips/ (small PNGs),
    so the report can show them without reaching outside the run directory."""
    plan = inp.plan
    protected = set(plan.protected_indices)
    records = inp.manifests["heldout"].records
    flipped = np.flatnonzero(p_old.correct & ~p_new.correct)
    out: list[dict] = []
    per_class: dict[int, int] = {}
    folder = run_dir / "flips"
    for i in flipped:
        y = int(p_old.labels[i])
        if y not in protected or per_class.get(y, 0) >= MAX_FLIP_THUMBNAILS:
            continue
        per_class[y] = per_class.get(y, 0) + 1
        rec = records[i]
        name = f"{y:03d}-{per_class[y]:02d}.png"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(rec.path) as src:
                im = src.convert("RGB")
                im.thumbnail((96, 96))
                im.save(folder / name, format="PNG")
        except OSError:
            continue  # the image was readable at evaluation; a vanished file only loses its thumbnail
        out.append(
            {
                "class": plan.classes[y],
                "path": f"flips/{name}",
                "source": str(rec.path),
                "old_pred": plan.classes[int(p_old.preds[i])],
                "new_pred": plan.classes[int(p_new.preds[i])],
            }
        )
    return out


def _baseline_summary(method: str, frag: dict) -> dict:
    return {
        "method": method,
        "verdict": frag["verdict"],
        "capabilities": [
            {
                "name": c["name"],
                "status": c["status"],
                "accuracy_change": c["accuracy_change"],
                "drop_upper_bound": c["drop_upper_bound"],
            }
            for c in frag["capabilities"]
        ],
        "target": {
            "old_accuracy": frag["target"]["old_accuracy"],
            "new_accuracy": frag["target"]["new_accuracy"],
            "goal_met": frag["target"]["goal_met"],
        },
    }


def _provenance(inp: Loaded, old, new_info: dict, command: str, started: str, seed: int | None) -> dict:
    return {
        "spec_digest": inp.spec_digest,
        "old_model": {"source": old.source, "digest": old.digest},
        "new_model": new_info,
        "data": dict(inp.digests),
        "seed": seed,
        "versions": versions(),
        "command": command,
        "started": started,
        "finished": utc_now(),
        "host": platform.node(),
        "processes": dist_context().world,
    }


def _spec_block(inp: Loaded) -> dict:
    return {
        "name": inp.plan.name,
        "title": inp.plan.title,
        "description": inp.plan.description,
        "path": str(inp.spec_path),
        "digest": inp.spec_digest,
        "text": inp.spec_text,
    }


def write_run(rd: RunDir, result: dict, *, log: Callable[[str], None], complete: bool = True) -> dict:
    """The run directory's last stage: check the result against its schema, write result.json, render the
    report from it and mark the run complete (in that order, so nothing claims certification early).
    ``complete=False`` leaves the marking to the caller (a lineage registers the release first)."""
    result["schema_version"] = SCHEMA_VERSION
    try:
        parse_result(result)  # never write a result.json that a reader would refuse (fail closed)
    except ValueError as e:
        raise RunError(f"internal error: the run's result does not match its schema: {e}") from None
    if not rd.writes:
        return result
    atomic_write_json(rd.path / "result.json", result)
    render_report(rd.path, finishing=True)
    if complete:
        rd.complete(result["verdict"])
    log(f"wrote {rd.path / 'result.json'}, {rd.path / 'report.html'}, {rd.path / 'junit.xml'}")
    return result


# ----------------------------------------------------------------------------------- training
@dataclass
class Candidate:
    """A trained method's selected model, saved in the run directory, and how it was chosen."""

    method: str
    outcome: TrainOutcome
    model: torch.nn.Module
    path: Path  # models/<method>.safetensors inside the run directory
    digest: str


def train_candidate(
    inp: Loaded,
    old: LoadedModel,
    data: TrainData,
    method: str,
    *,
    rd: RunDir,
    cache: PredictionCache,
    resume: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> Candidate:
    """Train one method from the old model (which stays untouched) and save the selected weights."""
    plan = inp.plan
    log(f"training: method {method}")
    torch.manual_seed(plan.optimizer.seed)
    trainee = dataclasses.replace(old, model=copy.deepcopy(old.model))
    trainer = Trainer(plan, trainee, data, method=method, run_dir=rd.path, cache=cache, quiet=quiet, log=log)
    outcome = trainer.run(resume=resume)
    trainee.model.load_state_dict(outcome.state_dict)
    path = rd.path / "models" / f"{method}.safetensors"
    if rd.writes:
        meta = {"method": method, "spec": plan.name, "selected_step": str(outcome.selected_step)}
        digest = save_checkpoint(trainee.model, path, meta)
    else:
        digest = weights_digest(trainee.model)
    log(f"{method}: {outcome.reason}")
    return Candidate(method, outcome, trainee.model, path, digest)


def _cycle_result(
    inp: Loaded, old: LoadedModel, main: Candidate, certs: dict[str, dict], rd: RunDir, command: str
) -> dict:
    """result.json of a cycle: the main method's certificate, how it was selected and trained, the
    baselines' summaries and the provenance."""
    outcome = main.outcome
    result = dict(certs[main.method])
    result.update(
        {
            "spec": _spec_block(inp),
            "method": main.method,
            "classes": list(inp.plan.classes),
            "selection": {
                "step": outcome.selected_step,
                "reason": outcome.reason,
                "fell_back_to_old": outcome.fell_back_to_old,
                **outcome.validation,
            },
            "training": {
                "steps": outcome.steps,
                "seconds": round(outcome.seconds, 2),
                "trajectory": "trajectory.jsonl",
            },
            "baselines": [_baseline_summary(m, certs[m]) for m in certs if m != main.method],
            "provenance": _provenance(
                inp,
                old,
                {"path": str(main.path.relative_to(rd.path)), "digest": main.digest},
                command,
                rd.started,
                inp.plan.optimizer.seed,
            ),
        }
    )
    return result


def heldout_evidence(plan: Plan, labels: np.ndarray) -> list[str]:
    """What the held-out split lets a release lose, said before anything is trained: for each group of
    capabilities with the same size, tolerance and confidence, the most negative flips (none gained) that
    still certify, or a warning where not even an unchanged model can be certified. A spec writer reads
    here that 200 images at 3 points allow one flip per capability (docs/selection.md)."""
    groups: dict[tuple[int, float, float], list[str]] = {}
    for c in plan.constraints:
        n = int(np.isin(labels, c.class_indices).sum())
        groups.setdefault((n, c.tolerance, c.confidence), []).append(c.name)
    test = plan.certify.test
    out = []
    for (n, tol, conf), names in sorted(groups.items()):
        who = ", ".join(repr(x) for x in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        at = f"tolerance {tol * 100:g} pp, confidence {conf * 100:g}%, {test} test"
        allowed = stats.flip_allowance(n, tol, conf, test)
        if allowed < 0:
            need = stats.min_informative_n(tol, conf, test)
            out.append(
                f"warning: {n} held-out images each for {who}: too few to certify even an unchanged model "
                f"({at}; {need} or more needed)"
            )
        else:
            flips = f"{allowed} negative flip{'' if allowed == 1 else 's'}"
            out.append(
                f"held-out evidence: {n} images each for {who}: each certifies with at most {flips} "
                f"and none gained ({at})"
            )
    return out


# ----------------------------------------------------------------------------------- commands
def run_cycle(
    spec_path: Path | str,
    *,
    resume: bool = False,
    quiet: bool = False,
    out: Path | None = None,
    cache_dir: Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    method: str | None = None,
) -> dict:
    """``safespec run``: the whole cycle. Returns the result dict (its ``verdict`` decides the exit code)."""
    inp = load_inputs(Path(spec_path), log=log)
    plan = inp.plan
    for line in heldout_evidence(plan, inp.manifests["heldout"].labels):
        log(line)
    rd = RunDir(out or plan.report_dir)
    command = command or " ".join(["safespec", *sys.argv[1:]])
    rd.start(command)
    try:
        cache = PredictionCache(cache_dir)
        torch.manual_seed(plan.optimizer.seed)
        old = load_model(plan.model, plan.classes)
        check_parent(plan, old)
        device = next(old.model.parameters()).device
        data = make_train_data(inp, old.preprocess)
        main_method = method or plan.optimizer.method
        certs: dict[str, dict] = {}
        main: Candidate | None = None
        for m in (main_method, *[b for b in plan.optimizer.baselines if b != main_method]):
            cand = train_candidate(inp, old, data, m, rd=rd, cache=cache, resume=resume, quiet=quiet, log=log)
            certs[m] = certify_candidate(
                inp,
                old,
                cand.model,
                cand.digest,
                cache=cache,
                run_dir=rd.path,
                device=device,
                log=log,
                thumbnails=m == main_method,
            )
            if m == main_method:
                main = cand
            del cand
        assert main is not None
        traj = rd.path / f"trajectory-{main_method}.jsonl"
        if rd.writes and traj.exists():
            shutil.copyfile(traj, rd.path / "trajectory.jsonl")
        result = _cycle_result(inp, old, main, certs, rd, command)
        with registering(plan, old, result, rd, spec_text=inp.spec_text, new_model=main.path, log=log):
            write_run(rd, result, log=log, complete=False)
        rd.complete(result["verdict"])
        return result
    except BaseException as exc:
        rd.fail(failure_reason(exc))
        raise


def verify_candidate(
    spec_path: Path | str,
    candidate: Path | str,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """``safespec verify``: certify a model trained elsewhere against the spec's old model."""
    spec_path = Path(spec_path)
    inp = load_inputs(spec_path, log=log)
    plan = inp.plan
    candidate = Path(candidate)
    if not candidate.is_file():
        raise RunError(f"--candidate: no such checkpoint file: {candidate}")
    rd = RunDir(out or Path(plan.report_dir))
    command = command or " ".join(["safespec", *sys.argv[1:]])
    rd.start(command)
    try:
        cache = PredictionCache(cache_dir)
        old = load_model(plan.model, plan.classes)
        new = load_model(dataclasses.replace(plan.model, pretrained=None, checkpoint=str(candidate)), plan.classes)
        device = next(old.model.parameters()).device
        result = certify_candidate(
            inp, old, new.model, new.digest, cache=cache, run_dir=rd.path, device=device, log=log
        )
        result.update(
            {
                "spec": _spec_block(inp),
                "method": "verify",
                "classes": list(plan.classes),
                "selection": None,
                "training": None,
                "baselines": [],
                "provenance": _provenance(
                    inp, old, {"path": str(candidate), "digest": new.digest}, command, rd.started, None
                ),
            }
        )
        if result.get("lineage"):
            result["lineage"]["registration"] = "not registered: safespec verify certifies without releasing"
        return write_run(rd, result, log=log)
    except BaseException as exc:
        rd.fail(failure_reason(exc))
        raise
