"""The spec language, version 1: pydantic models that are at once schema, validation and Python API.

A spec is what a safety engineer signs off: which old model, which capabilities must be kept (and by
how much), which task must improve, on which data, and how confident the certificate must be.
Everything here is plain data; nothing imports torch, so a spec can be validated anywhere (an editor,
a CI lint step) without the training stack.

Cross-field rules report the path of the offending field (``SpecRuleError.loc``) so that the YAML
loader in :mod:`safespec.spec.load` can point at the file and line.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

SPEC_VERSION = 1

#: The optimisation methods, named once: the spec's choices, the CLI's --method and the trainer's registry
#: all read this.
Method = Literal["penalty", "lagrangian", "unconstrained", "replay", "wise-ft"]
METHODS: tuple[str, ...] = typing.get_args(Method)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, and models are immutable once validated.

    Strict types: ``steps: true`` or ``lr: "fast"`` must be errors, not silently coerced into 1 or a
    crash mid-training; NaN and infinity are never meaningful settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)


def _rule(loc: tuple, message: str) -> PydanticCustomError:
    """A cross-field error that carries the location of the field it is about.

    Pydantic places a validator's error at the path of what it validates (the model for a model
    validator, the field for a field validator); ``rule_loc`` is the culprit's path *relative to that*,
    carried in the context so that the file loader can point at the right line.
    """
    return PydanticCustomError("spec_rule", "{message}", {"message": message, "rule_loc": list(loc)})


def _suggest(word: str, options: list[str]) -> str:
    """'; did you mean 'x'?' when a known option is close to ``word``, else ''."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _known(word: str, options: list[str]) -> str:
    """A did-you-mean, or the options themselves when they are few enough to read in one line."""
    hint = _suggest(word, options)
    if hint or len(options) > 12:
        return hint
    return " (" + ", ".join(options) + ")"


def _path(v: Any) -> Any:
    """Paths are written as non-empty strings; an empty one would silently mean the spec's own folder."""
    if isinstance(v, str) and not v.strip():
        raise PydanticCustomError("spec_rule", "{message}", {"message": "must not be empty", "rule_loc": []})
    return v


# A file path as the spec writes it: a string (strict mode would otherwise demand a Path object).
SpecPath = Annotated[Path, Field(strict=False, json_schema_extra={"minLength": 1}), BeforeValidator(_path)]


# ---------------------------------------------------------------------------------------------- model
class HeadsSpec(_Strict):
    """Task-dependent heads: one low-rank adapter per class on the text projection (method.md section 3)."""

    enabled: bool = Field(True, description="Add one low-rank head per class plus one for negatives.")
    rank: int = Field(32, ge=1, le=1024, description="Rank of each head's adapter A_k B_k (the paper uses 32).")


class ModelSpec(_Strict):
    """The old model: an open_clip architecture plus exactly one source of weights."""

    arch: str = Field(
        ...,
        min_length=1,
        description="open_clip architecture name, e.g. 'ViT-B-16' or a shipped config such as 'safespec-mini-vit'.",
    )
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. 'openai', 'laion2b_s34b_b88k') or an 'hf-hub:org/name' model."
    )
    checkpoint: SpecPath | None = Field(
        None,
        description="Local checkpoint of the old model (.safetensors, or a torch file loadable with weights_only=True). Relative to the spec file.",
    )
    from_: Literal["lineage"] | None = Field(
        None,
        alias="from",
        description="'lineage': the old model is the latest release of the lineage named in lineage.dir (the cycle continues it).",
    )
    heads: HeadsSpec = Field(default_factory=HeadsSpec, description="Task-dependent heads.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision for training and evaluation on accelerators; CPU runs use fp32."
    )
    freeze: list[Literal["image", "text"]] = Field(
        default_factory=list, description="Towers kept frozen; their features are computed once and cached."
    )
    target_tower: bool = Field(
        False,
        description="Give the target class its own copy of the image tower and train only that: every other class's logit stays exactly the old model's, so the only decisions the cycle can change are those into and out of the target class (docs/spec.md).",
    )

    @field_validator("freeze")
    @classmethod
    def _freeze_once(cls, v: list[str]) -> list[str]:
        for j, tower in enumerate(v):
            if tower in v[:j]:
                raise _rule((j,), f"tower {tower!r} is listed twice")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.from_ is not None and (self.pretrained is not None or self.checkpoint is not None):
            other = "checkpoint" if self.checkpoint is not None else "pretrained"
            raise _rule(("from",), f"give one source of the old model: 'from: lineage' or {other!r}, not both")
        if self.pretrained is not None and self.checkpoint is not None:
            raise _rule(("checkpoint",), "give either 'pretrained' or 'checkpoint', not both")
        if self.pretrained is None and self.checkpoint is None and self.from_ is None:
            raise _rule(
                (),
                "needs the old model's weights: 'pretrained' (an open_clip tag), 'checkpoint' (a local file) "
                "or 'from: lineage' (the lineage's latest release)",
            )
        return self


# -------------------------------------------------------------------------------------------- classes
class ClassesSpec(_Strict):
    """The task: its class names and the prompt templates that turn a class name into text."""

    names: list[str] = Field(
        ..., min_length=2, description="Class names, in label order. Labels in manifests use these names."
    )
    templates: list[str] = Field(
        ["a photo of a {}."],
        min_length=1,
        description="Prompt templates; '{}' (exactly once, no other braces) is replaced by the class name. Embeddings are averaged over templates.",
    )

    @field_validator("names")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for j, name in enumerate(v):
            if not name.strip():
                raise _rule((j,), "class names must not be empty")
            if name != name.strip():
                raise _rule((j,), f"class name {name!r} has leading or trailing spaces")
            if name in seen:
                raise _rule((j,), f"class {name!r} is listed twice (first at names[{seen[name]}])")
            seen[name] = j
        return v

    @field_validator("templates")
    @classmethod
    def _placeholder(cls, v: list[str]) -> list[str]:
        for j, t in enumerate(v):
            if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1:
                raise _rule(
                    (j,),
                    f"a template needs exactly one '{{}}' placeholder for the class name and no other braces (got {t!r})",
                )
        return v


# ----------------------------------------------------------------------------------------------- data
class DataSpec(_Strict):
    """Where the images are. Each split is a CSV manifest (``path,label[,caption]``, paths relative to
    the manifest) or a folder with one sub-folder per class. Paths are relative to the spec file."""

    protected: SpecPath = Field(
        ..., description="Protected store S_k: stored examples of the protected classes (the constraints' data)."
    )
    target: SpecPath = Field(
        ...,
        description="Target training set: rows of the target class are positives, other rows negatives; an optional caption column.",
    )
    validation: SpecPath = Field(..., description="Validation split for checkpoint selection (all classes).")
    heldout: SpecPath = Field(..., description="Held-out certification split; never seen by training or selection.")
    base: SpecPath | None = Field(
        None, description="Optional: the old model's own training set (used only by the oracle baseline)."
    )


# -------------------------------------------------------------------------------------------- protect
class ConstraintSpec(_Strict):
    """The training constraint that enforces a capability: L_k(new) - L_k(old) <= slack."""

    metric: Literal["loss", "smooth-accuracy", "distill", "focal-distill", "margin"] = Field(
        "loss",
        description="'loss': mean cross-entropy on the store (the paper); 'smooth-accuracy': a sigmoid-margin accuracy proxy; 'distill': the KL divergence from the old model's class probabilities (at optimize.constraint_tau) to the new one's, which moves when a memorised image's whole prediction moves, not only its true class; 'focal-distill': the same divergence weighted 6x on the images the old model gets right (positive-congruent training); 'margin': how far each image's soft margin (its true class's log-odds at optimize.constraint_tau) falls below the old model's, one-sided and weighted like 'focal-distill', so that only movement toward a flip costs.",
    )
    slack: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Allowed increase of the metric over the old model's value, in the metric's units (0 = strict; 'distill' needs a slack > 0, in nats).",
    )

    @model_validator(mode="after")
    def _distill_slack(self) -> ConstraintSpec:
        # KL(old || new) is 0 only at the old model itself: a strict 'distill' constraint would forbid every
        # change, so it fails here rather than as a run that never moves
        if self.metric in ("distill", "focal-distill") and self.slack <= 0.0:
            raise _rule(
                ("slack",),
                f"metric {self.metric!r} bounds the divergence from the old model, which is 0 only for the old model itself; give a slack > 0 (nats per image, e.g. 0.02)",
            )
        return self


class ProtectSpec(_Strict):
    """One protected capability: the classes it covers and how much held-out accuracy it may lose."""

    name: str | None = Field(
        None, description="Name shown in the report; defaults to the class name (or the classes joined by '+')."
    )
    classes: list[str] | Literal["others"] = Field(
        ..., description="Classes of this capability, or 'others' for every class except the target."
    )
    each: bool = Field(
        False, description="Expand into one capability per class (e.g. 364 classes of Places365, one entry)."
    )
    tolerance: float = Field(
        ...,
        ge=0.0,
        le=1.0,
        description="Largest accepted drop of held-out accuracy (non-inferiority margin), e.g. 0.03.",
    )
    confidence: float | None = Field(
        None, gt=0.5, lt=1.0, description="Confidence of this capability's certificate; defaults to certify.confidence."
    )
    constraint: ConstraintSpec = Field(
        default_factory=ConstraintSpec, description="The training constraint that enforces it."
    )
    budget: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drift budget over the lineage (needs lineage.dir): the most held-out accuracy this capability may have lost against any earlier release (or the lineage's origin), certified against each one on this cycle's held-out split, e.g. 0.05.",
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _list_or_others(cls, v: Any) -> Any:
        # One clear error instead of one per member of the union.
        if v == "others":
            return v
        if isinstance(v, str):
            raise _rule((), f"must be a list of class names or 'others' (got {v!r}); write [{v}] for a single class")
        if not isinstance(v, list):
            raise _rule((), f"must be a list of class names or 'others' (got {v!r})")
        if not v:
            raise _rule((), "list at least one class (or write 'others')")
        for j, c in enumerate(v):
            if not isinstance(c, str):
                raise _rule((j,), f"class names are strings (got {c!r}); quote it")
        return v


# --------------------------------------------------------------------------------------------- target
class GoalSpec(_Strict):
    """What counts as success on the target; both may be given, then both must hold."""

    min_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="Held-out accuracy the new model must reach on the target class."
    )
    min_improvement: float | None = Field(
        None, ge=-1.0, le=1.0, description="Held-out accuracy gain over the old model the target must reach."
    )

    @model_validator(mode="after")
    def _some(self) -> GoalSpec:
        if self.min_accuracy is None and self.min_improvement is None:
            raise _rule((), "give 'min_accuracy', 'min_improvement' or both")
        return self


class TargetSpec(_Strict):
    """The task to improve (or add)."""

    class_: str = Field(..., alias="class", description="The class to improve; must be in classes.names.")
    goal: GoalSpec = Field(
        default_factory=lambda: GoalSpec(min_improvement=0.0), description="The target's success criterion."
    )


# ------------------------------------------------------------------------------------------- optimize
class BatchSpec(_Strict):
    """Batch composition per step: a target batch and a class-balanced protected batch (method.md section 2)."""

    target: int = Field(64, ge=2, description="Target batch size (half positives, half negatives).")
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of target positives in a target batch.")
    protected_classes: int = Field(5, ge=1, description="Protected classes drawn at random per step.")
    per_class: int = Field(10, ge=1, description="Stored images per drawn protected class per step.")


class PenaltySpec(_Strict):
    """Settings of the paper's quadratic penalty method."""

    beta: float = Field(
        100.0, gt=0.0, description="Penalty weight beta (100 for BDD100K, 1000 for Places365 in the paper)."
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Constant beta, or a cosine increase from 0 to beta over training."
    )
    form: Literal["squared-hinge", "hinge"] = Field(
        "squared-hinge", description="(beta/2)[u]_+^2 as in the paper, or the hinge beta*[u]_+."
    )


class LagrangianSpec(_Strict):
    """Settings of the exact-multiplier (Lagrangian) method."""

    multiplier_lr: float = Field(10.0, gt=0.0, description="Step size of the multipliers' ascent.")
    rho: float = Field(
        0.0, ge=0.0, description="Augmented-Lagrangian quadratic term (0 = plain gradient descent-ascent)."
    )
    max_multiplier: float = Field(1e4, gt=0.0, description="Cap on each multiplier, a guard against runaway ascent.")


class WiseFTSpec(_Strict):
    """Settings of the WiSE-FT baseline (weight interpolation between the old model and a fine-tune)."""

    grid: int = Field(
        11, ge=2, le=101, description="Mixing weights tried between the old model (0) and the fine-tune (1)."
    )


class CalibrateSpec(_Strict):
    """The target's decision offset, chosen on validation at every evaluation (docs/selection.md)."""

    target_offset: bool | Literal["per-rival"] = Field(
        False,
        description="Choose an offset of the target's logit on validation at every evaluation: the largest whose candidate stays admissible under optimize.select; checkpoints are then compared at their offsets. 'per-rival': then grow it separately against each rival class (the class the target competes with on an image), so that one protected class close to the target does not hold the offset back against every other.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, v: Any) -> Any:
        mode = v.get("target_offset", False) if isinstance(v, dict) else False
        if not isinstance(mode, bool) and mode != "per-rival":
            raise _rule(
                ("target_offset",),
                f"must be true, false or 'per-rival' (got {mode!r})"
                + (_suggest(mode, ["per-rival"]) if isinstance(mode, str) else ""),
            )
        if isinstance(v, dict) and "max_drop" in v:
            raise _rule(
                ("max_drop",),
                "was replaced by optimize.select.min_certify_probability (a flip-count rule "
                "meant something different at every validation size); remove it",
            )
        return v


class SelectSpec(_Strict):
    """How checkpoints (and target offsets) are chosen on validation (docs/selection.md)."""

    min_certify_probability: float = Field(
        0.8,
        ge=0.5,
        lt=1.0,
        description="A candidate is admissible when its validation evidence predicts, with at least this probability, that every protected capability passes the held-out certificate; the best target among admissible candidates is selected.",
    )


class OptimizeSpec(_Strict):
    """The optimizer: the paper's penalty method, exact multipliers, or a baseline, with the paper's defaults."""

    method: Method = Field(
        "penalty",
        description="'penalty' (the paper), 'lagrangian' (exact multipliers), or the baselines 'unconstrained', 'replay', 'wise-ft'.",
    )
    objective: Literal["contrastive", "ce"] = Field(
        "contrastive",
        description="Target objective: the one-way contrastive loss (method.md section 4) or cross-entropy.",
    )
    baselines: list[Literal["unconstrained", "replay", "wise-ft"]] = Field(
        default_factory=list, description="Baselines also run, certified and shown side by side in the report."
    )
    steps: int = Field(600, ge=1, description="Training steps.")
    seed: int = Field(0, ge=0, description="Seed for sampling, initialisation of heads and everything random.")
    lr: float = Field(1e-6, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps before cosine decay.")
    batch: BatchSpec = Field(
        default_factory=BatchSpec, description="Batch sizes and the class-balanced protected batch."
    )
    gamma: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Moving-average weight of the constraint estimates u_k (and the contrastive inner means).",
    )
    constraint_tau: float = Field(0.05, gt=0.0, description="Temperature of the zero-shot logits in the constraints.")
    temperature: float = Field(
        0.05,
        gt=0.0,
        description="Temperature of the target objective: the contrastive loss, or the logits of the CE objective (kept apart from constraint_tau, so softening the constraints does not soften the target).",
    )
    penalty: PenaltySpec = Field(default_factory=PenaltySpec, description="Settings of method 'penalty'.")
    lagrangian: LagrangianSpec = Field(default_factory=LagrangianSpec, description="Settings of method 'lagrangian'.")
    wise_ft: WiseFTSpec = Field(
        default_factory=WiseFTSpec, alias="wise-ft", description="Settings of the 'wise-ft' baseline."
    )
    calibrate: CalibrateSpec = Field(
        default_factory=CalibrateSpec, description="The target's decision offset, chosen on validation."
    )
    select: SelectSpec = Field(
        default_factory=SelectSpec, description="Checkpoint (and offset) selection on validation."
    )
    store_views: int = Field(
        0,
        ge=0,
        le=16,
        description="Fixed augmented copies (shift, rotation, scale, mirror) of every stored image that the constraints also measure: images the old model did not fit, closer to what the certificate sees than its own training data.",
    )
    target_views: int = Field(
        0,
        ge=0,
        le=16,
        description="Fixed augmented copies (as store_views draws them) of every target-set image, trained on with the originals: more distinct positives for a target whose own images are few.",
    )
    eval_every: int = Field(
        100, ge=1, description="Evaluate on the validation split every N steps (checkpoint selection)."
    )
    checkpoint_every: int = Field(100, ge=1, description="Save the resumable training state every N steps.")

    @model_validator(mode="after")
    def _warmup(self) -> OptimizeSpec:
        if self.warmup_steps >= self.steps:
            raise _rule(("warmup_steps",), f"must be smaller than steps ({self.steps}) (got {self.warmup_steps})")
        if self.method in self.baselines:
            raise _rule(("baselines",), f"'{self.method}' is already the method; list only other baselines")
        return self


# -------------------------------------------------------------------------------------------- certify
class CertifySpec(_Strict):
    """The held-out certificate and the release gate."""

    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Default confidence of each capability's certificate (one-sided)."
    )
    require: Literal["certified", "preserved"] = Field(
        "certified",
        description="What the release gate requires of every capability: a confidence bound within tolerance ('certified') or only the point estimate ('preserved').",
    )
    test: Literal["exact", "score"] = Field(
        "exact",
        description="The test behind each capability's drop bound: 'exact' (an exact unconditional test: its false-certification rate stays at or below 1 - confidence) or 'score' (Tango's asymptotic score test, which can exceed it slightly near the tolerance).",
    )


class ReportSpec(_Strict):
    """Where the run directory and its audit report go."""

    dir: SpecPath = Field(
        Path("out/run"),
        description="Run directory (result.json, report.html, junit.xml, trajectory). Relative to the working directory.",
    )
    title: str | None = Field(None, description="Report title; defaults to the spec name.")


# -------------------------------------------------------------------------------------------- lineage
class LineageSpec(_Strict):
    """The lineage of releases this cycle belongs to (docs/lineage.md)."""

    dir: SpecPath = Field(
        ...,
        description="The lineage registry's folder (created by the first release). Relative to the spec file.",
    )
    carry_tolerance: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Tolerance of the capabilities carried from earlier releases that this spec does not protect itself (a class an earlier cycle improved, one it certified); defaults to the smallest tolerance in protect.",
    )
    carry_budget: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drift budget of the carried capabilities (see protect[].budget); none by default.",
    )
    register_: bool = Field(
        True,
        alias="register",
        description="Register the new model as the lineage's next release when it is certified and the target reaches its goal (false: certify against the lineage without releasing).",
    )


# --------------------------------------------------------------------------------------------- export
#: A registered model's name: it becomes part of model URIs ('models:/NAME/3'), so no '/', ':' or spaces.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class MlflowExportSpec(_Strict):
    """Where ``safespec run`` logs the finished run, and which registered model a release becomes a version of
    (docs/mlflow.md). The spec language only describes it; MLflow itself is needed only by the export."""

    tracking_uri: str | None = Field(
        None,
        min_length=1,
        pattern=r"^\S+$",
        description="MLflow tracking URI, e.g. 'sqlite:///mlflow.db' or 'https://mlflow.example.com'; default: MLFLOW_TRACKING_URI, else MLflow's default. Relative file paths in it are relative to the working directory. No credentials: use MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="MLflow experiment of the run (created when missing); default: the registered model's name.",
    )
    model_name: str | None = Field(
        None,
        min_length=1,
        max_length=250,
        pattern=MODEL_NAME_PATTERN,
        description="Registered model that a release becomes a version of; default: the spec's name. Give every cycle of a lineage the same one.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # the spec's text is copied into result.json, the report and MLflow itself: a password in it would
        # travel with every copy
        if v is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@", v):
            raise _rule(
                (),
                "must not hold credentials (the spec's text is copied into result.json, the report and MLflow); "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, instead",
            )
        return v

    @field_validator("experiment")
    @classmethod
    def _trimmed(cls, v: str | None) -> str | None:
        if v is not None and v != v.strip():
            raise _rule((), f"has leading or trailing spaces (got {v!r})")
        return v


class ExportSpec(_Strict):
    """Where a finished run is exported to, after its run directory is complete (docs/mlflow.md)."""

    mlflow: MlflowExportSpec = Field(
        ..., description="Log the run to MLflow and register a release as a model version (safespec export mlflow)."
    )


# ----------------------------------------------------------------------------------------------- spec
class Spec(_Strict):
    """A safespec release spec, version 1."""

    safespec: Literal[1] = Field(..., description="Spec language version; this release reads version 1.")
    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Short identifier of this development cycle (letters, digits, '.', '_', '-').",
    )
    description: str | None = Field(None, description="What this cycle is for, for the reviewers.")
    model: ModelSpec = Field(..., description="The old model and how it is adapted.")
    classes: ClassesSpec = Field(..., description="The task's classes and prompt templates.")
    data: DataSpec = Field(..., description="The data splits (CSV manifests or class folders).")
    protect: list[ProtectSpec] = Field(..., min_length=1, description="Protected capabilities.")
    target: TargetSpec = Field(..., description="The class to improve and its goal.")
    optimize: OptimizeSpec = Field(default_factory=OptimizeSpec, description="The training method and its settings.")
    certify: CertifySpec = Field(
        default_factory=CertifySpec, description="Certificate confidence and the release gate."
    )
    report: ReportSpec = Field(default_factory=ReportSpec, description="Run directory and report title.")
    lineage: LineageSpec | None = Field(
        None, description="The lineage this cycle continues: its registry, and what carries over from earlier releases."
    )
    export: ExportSpec | None = Field(
        None,
        description="Export the finished run (MLflow); a failed export leaves the run directory as it is and exits 2.",
    )

    @field_validator("safespec", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # Literal[1] alone would also take `true` and `1.0`.
        if type(v) is not int or v != SPEC_VERSION:
            raise _rule(
                (),
                f"unsupported spec language version {v!r}; this safespec reads version {SPEC_VERSION} (write 'safespec: {SPEC_VERSION}')",
            )
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> Spec:
        names = set(self.classes.names)
        listed = list(self.classes.names)
        target = self.target.class_
        if target not in names:
            raise _rule(
                ("target", "class"), f"unknown class {target!r}; expected one of classes.names{_known(target, listed)}"
            )
        seen: dict[str, int] = {}
        for i, p in enumerate(self.protect):
            if p.classes == "others":
                continue
            for j, c in enumerate(p.classes):
                if c not in names:
                    raise _rule(
                        ("protect", i, "classes", j),
                        f"unknown class {c!r}; expected one of classes.names{_known(c, listed)}",
                    )
                if c == target:
                    raise _rule(
                        ("protect", i, "classes", j),
                        f"class {c!r} is the target; a class cannot be both improved and protected",
                    )
                if c in seen:
                    raise _rule(("protect", i, "classes", j), f"class {c!r} is already protected by protect[{seen[c]}]")
                seen[c] = i
        if self.lineage is None:
            if self.model.from_ is not None:
                raise _rule(("model", "from"), "'from: lineage' needs the lineage's registry: add lineage: {dir: ...}")
            for i, p in enumerate(self.protect):
                if p.budget is not None:
                    raise _rule(
                        ("protect", i, "budget"),
                        "a drift budget is counted over a lineage's releases: add lineage: {dir: ...}",
                    )
        if any(p.classes == "others" for p in self.protect) and len(self.protect) > 1:
            i = next(i for i, p in enumerate(self.protect) if p.classes == "others")
            raise _rule(
                ("protect", i, "classes"), "'others' covers every non-target class; it must be the only protect entry"
            )
        return self

    def resolve(self, base: Path) -> Spec:
        """Return a copy whose relative paths (checkpoint, data) are anchored at ``base`` (the spec's folder).

        ``report.dir`` stays relative to the working directory, where runs are started."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else Path(os.path.normpath(base / p))

        data = self.data.model_copy(update={k: fix(getattr(self.data, k)) for k in DataSpec.model_fields})
        model = self.model.model_copy(update={"checkpoint": fix(self.model.checkpoint)})
        update: dict[str, Any] = {"data": data, "model": model}
        if self.lineage is not None:
            update["lineage"] = self.lineage.model_copy(update={"dir": fix(self.lineage.dir)})
        return self.model_copy(update=update)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of spec language v1 (what ``safespec schema`` prints), for editors and linters.

    Keys are the YAML spellings (aliases such as ``class`` and ``wise-ft``)."""
    schema = Spec.model_json_schema(by_alias=True, mode="validation")
    schema = {"$schema": JSON_SCHEMA_DIALECT, **schema}
    schema["title"] = f"safespec spec, language version {SPEC_VERSION}"
    return schema
