"""The compiler: a validated :class:`~safespec.spec.Spec` becomes an immutable, typed :class:`Plan`.

Later stages (train, certify, report) consume only the plan, never the raw spec, so every shorthand
(``classes: others``, ``each: true``, per-capability confidence defaults) is expanded here, once, and
every invalid combination fails here, before a single image is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError
from .lineage.registry import LineageError, Registry, Release
from .spec import Spec, read_spec


class PlanError(ValueError):
    """A combination the spec language accepts but that cannot be planned.

    ``field`` is the spec field's path as written in a spec (``protect[3].name``,
    ``optimize.batch.protected_classes``), so that :mod:`safespec.spec.load` can point at its line."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


@dataclass(frozen=True)
class Constraint:
    """One protected capability, as training and certification see it."""

    name: str
    classes: tuple[str, ...]
    class_indices: tuple[int, ...]
    metric: str  # "loss" | "smooth-accuracy" | "distill" | "focal-distill" | "margin"
    slack: float  # training right-hand side eps_k, in the metric's units
    tolerance: float  # certificate non-inferiority margin, in held-out accuracy
    confidence: float
    budget: float | None = None  # drift budget against every earlier release of the lineage
    carried_from: str | None = None  # the release this capability was carried from ('release 2'), if any

    def __post_init__(self):
        if len(self.classes) != len(self.class_indices) or not self.classes:
            raise PlanError("protect", f"capability {self.name!r} has no classes")
        if not 0.0 <= self.tolerance <= 1.0:
            raise PlanError("protect", f"capability {self.name!r}: tolerance {self.tolerance} out of [0, 1]")
        if not 0.5 < self.confidence < 1.0:
            raise PlanError("protect", f"capability {self.name!r}: confidence {self.confidence} out of (0.5, 1)")


@dataclass(frozen=True)
class Objective:
    target_class: str
    target_index: int
    kind: str  # "contrastive" | "ce"
    min_accuracy: float | None
    min_improvement: float | None


@dataclass(frozen=True)
class ModelPlan:
    arch: str
    pretrained: str | None
    checkpoint: str | None
    heads: bool
    rank: int
    device: str
    precision: str
    freeze: tuple[str, ...]
    target_tower: bool = False


@dataclass(frozen=True)
class DataPlan:
    protected: str
    target: str
    validation: str
    heldout: str
    base: str | None


@dataclass(frozen=True)
class BatchPlan:
    """One step's draw (``optimize.batch``)."""

    target: int
    positive_fraction: float
    protected_classes: int
    per_class: int


@dataclass(frozen=True)
class PenaltyPlan:
    """The penalty method's settings (``optimize.penalty``)."""

    beta: float
    schedule: str  # "constant" | "cosine"
    form: str  # "squared-hinge" | "hinge"


@dataclass(frozen=True)
class LagrangianPlan:
    """The Lagrangian method's settings (``optimize.lagrangian``)."""

    multiplier_lr: float
    rho: float
    max_multiplier: float


@dataclass(frozen=True)
class WiseFtPlan:
    """The wise-ft baseline's settings (``optimize.wise_ft``)."""

    grid: int


@dataclass(frozen=True)
class CalibratePlan:
    """``optimize.calibrate``: what is calibrated on validation after every evaluation."""

    target_offset: bool | str = False  # True, or "per-rival" (the offset grown per rival class)

    @property
    def per_rival(self) -> bool:
        return self.target_offset == "per-rival"


@dataclass(frozen=True)
class SelectPlan:
    """``optimize.select``: when a candidate is admissible (docs/selection.md)."""

    min_certify_probability: float = 0.8


@dataclass(frozen=True)
class OptimizerPlan:
    """``optimize``, section for section and name for name: each method's settings stay in their own
    sub-plan, so a setting has one name from the spec to the trainer."""

    method: str
    baselines: tuple[str, ...]
    steps: int
    seed: int
    lr: float
    weight_decay: float
    warmup_steps: int
    batch: BatchPlan
    gamma: float
    constraint_tau: float
    temperature: float
    penalty: PenaltyPlan
    lagrangian: LagrangianPlan
    wise_ft: WiseFtPlan
    eval_every: int
    checkpoint_every: int
    calibrate: CalibratePlan = CalibratePlan()
    select: SelectPlan = SelectPlan()
    store_views: int = 0
    target_views: int = 0

    def updated(self, changes: dict[str, Any]) -> OptimizerPlan:
        """A copy with ``changes`` applied; a key names a field (``lr``) or a method's setting by its
        section (``penalty.beta``). An unknown name is a KeyError, not a silently ignored setting."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section, _, name = key.rpartition(".")
            if section:
                sub = getattr(self, section, None)
                if not dataclasses.is_dataclass(sub) or name not in {f.name for f in dataclasses.fields(sub)}:
                    raise KeyError(f"optimizer plan has no setting {key!r}")
                nested.setdefault(section, {})[name] = value
            elif name in {f.name for f in dataclasses.fields(self)}:
                top[name] = value
            else:
                raise KeyError(f"optimizer plan has no setting {key!r}")
        for section, values in nested.items():
            top[section] = dataclasses.replace(top.get(section, getattr(self, section)), **values)
        return dataclasses.replace(self, **top)


@dataclass(frozen=True)
class CertifyPlan:
    confidence: float
    require: str  # "certified" | "preserved"
    test: Literal["exact", "score"] = "exact"  # the test behind the drop bound


@dataclass(frozen=True)
class Ancestor:
    """An earlier model of the lineage that budgets are certified against."""

    id: int
    label: str  # 'origin', 'release 2'
    digest: str
    model_path: str


@dataclass(frozen=True)
class LineagePlan:
    """The lineage this cycle continues: its registry and every earlier release, origin first."""

    dir: str
    register: bool
    ancestors: tuple[Ancestor, ...]

    @property
    def latest(self) -> Ancestor | None:
        return self.ancestors[-1] if self.ancestors else None


@dataclass(frozen=True)
class Plan:
    """Everything later stages need, and nothing they could misread."""

    name: str
    description: str | None
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    model: ModelPlan
    data: DataPlan
    constraints: tuple[Constraint, ...]
    objective: Objective
    optimizer: OptimizerPlan
    certify: CertifyPlan
    report_dir: str
    title: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    lineage: LineagePlan | None = None

    @property
    def budgeted(self) -> tuple[Constraint, ...]:
        """The capabilities with a drift budget (certified against every ancestor too)."""
        return tuple(c for c in self.constraints if c.budget is not None)

    @property
    def protected_indices(self) -> tuple[int, ...]:
        """Class indices of every protected class, in constraint order."""
        return tuple(i for c in self.constraints for i in c.class_indices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})


def compile_spec(spec: Spec, releases: tuple[Release, ...] = (), *, lineage_read: bool = True) -> Plan:
    """Expand and check a validated spec. Paths are used as they are: resolve them first
    (:meth:`Spec.resolve`) when the spec came from a file. ``releases`` are the lineage's (``lineage.dir``'s
    index, read by :func:`load_plan`): the capabilities they carry and the ancestors budgets count against.
    ``lineage_read=False``: the registry was not read (a lint without the data), so an empty one is not an
    error and the plan's old model is left unresolved."""
    names = tuple(spec.classes.names)
    index = {n: i for i, n in enumerate(names)}
    target = spec.target.class_
    constraints = _constraints(spec, names, index, target)
    constraints += _carried(spec, constraints, releases, index)
    _check_rules(spec, constraints)
    o = spec.optimize
    return Plan(
        name=spec.name,
        description=spec.description,
        classes=names,
        templates=tuple(spec.classes.templates),
        model=_model_plan(spec, releases, lineage_read),
        data=DataPlan(
            protected=str(spec.data.protected),
            target=str(spec.data.target),
            validation=str(spec.data.validation),
            heldout=str(spec.data.heldout),
            base=_str(spec.data.base),
        ),
        constraints=tuple(constraints),
        objective=Objective(
            target_class=target,
            target_index=index[target],
            kind=o.objective,
            min_accuracy=spec.target.goal.min_accuracy,
            min_improvement=spec.target.goal.min_improvement,
        ),
        optimizer=_optimizer_plan(spec),
        certify=CertifyPlan(confidence=spec.certify.confidence, require=spec.certify.require, test=spec.certify.test),
        report_dir=str(spec.report.dir),
        title=spec.report.title or spec.name,
        lineage=_lineage_plan(spec, releases),
    )


def _lineage_plan(spec: Spec, releases: tuple[Release, ...]) -> LineagePlan | None:
    if spec.lineage is None:
        return None
    reg = Path(spec.lineage.dir)
    return LineagePlan(
        dir=str(reg),
        register=spec.lineage.register_,
        ancestors=tuple(Ancestor(r.id, r.label, r.digest, str(reg / r.model_file)) for r in releases),
    )


def _carried(
    spec: Spec, constraints: list[Constraint], releases: tuple[Release, ...], index: dict[str, int]
) -> list[Constraint]:
    """The capabilities earlier releases carry into this cycle: every class a release improved or was
    certified for stays protected, one capability per class, unless this spec protects it already or it is
    this cycle's target. A class the current classes do not list cannot be carried: that is an error."""
    if spec.lineage is None or not releases:
        return []
    covered = {c for k in constraints for c in k.classes}
    names = {k.name for k in constraints}
    target = spec.target.class_
    first = spec.protect[0]
    tol = spec.lineage.carry_tolerance
    tol = min(p.tolerance for p in spec.protect) if tol is None else tol
    # where each class comes from: the latest release that improved it, else the first certified for it
    source: dict[str, str] = {}
    for r in releases[1:]:
        for cls in (c for cap in r.certified for c in cap.classes):
            source.setdefault(cls, r.label)
        if r.target:
            source[r.target] = r.label
    out: list[Constraint] = []
    for cls, label in sorted(source.items(), key=lambda kv: index.get(kv[0], len(index))):
        if cls in covered or cls == target:
            continue
        if cls not in index:
            raise PlanError(
                "classes.names",
                f"{label} of the lineage protects class {cls!r}, which this spec does not list; "
                f"a lineage keeps its classes (add {cls!r})",
            )
        covered.add(cls)
        name = cls if cls not in names else f"carried/{cls}"
        names.add(name)
        out.append(
            Constraint(
                name=name,
                classes=(cls,),
                class_indices=(index[cls],),
                metric=first.constraint.metric,
                slack=first.constraint.slack,
                tolerance=tol,
                confidence=spec.certify.confidence,
                budget=spec.lineage.carry_budget,
                carried_from=label,
            )
        )
    return out


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _constraints(spec: Spec, names: tuple[str, ...], index: dict[str, int], target: str) -> list[Constraint]:
    """One constraint per capability (``each``: one per class), named uniquely; a clash is located at the
    protect[] entry that repeats the name."""
    constraints: list[Constraint] = []
    source: list[int] = []  # protect[] entry of each constraint, for located errors
    for i, p in enumerate(spec.protect):
        classes = [c for c in names if c != target] if p.classes == "others" else list(p.classes)
        conf = p.confidence if p.confidence is not None else spec.certify.confidence
        groups = [[c] for c in classes] if p.each else [classes]
        for g in groups:
            if p.each:
                name = f"{p.name}/{g[0]}" if p.name else g[0]
            else:
                name = p.name or "+".join(g)
            constraints.append(
                Constraint(
                    name=name,
                    classes=tuple(g),
                    class_indices=tuple(index[c] for c in g),
                    metric=p.constraint.metric,
                    slack=p.constraint.slack,
                    tolerance=p.tolerance,
                    confidence=conf,
                    budget=p.budget,
                )
            )
            source.append(i)
    seen: dict[str, int] = {}
    for k, c in enumerate(constraints):
        if c.name in seen:
            i, first = source[k], source[seen[c.name]]
            where = "" if i == first else f" (protect[{first}] has it too)"
            raise PlanError(
                f"protect[{i}].name" if spec.protect[i].name else f"protect[{i}].classes",
                f"two capabilities are named {c.name!r}{where}; give each a distinct name",
            )
        seen[c.name] = k

    return constraints


def _check_rules(spec: Spec, constraints: list[Constraint]) -> None:
    """Rules across fields that the section models cannot see on their own."""
    o = spec.optimize
    n_protected = sum(len(c.classes) for c in constraints)
    if o.batch.protected_classes > n_protected:
        raise PlanError(
            "optimize.batch.protected_classes",
            f"draws {o.batch.protected_classes} protected classes per step but only {n_protected} "
            f"{'is' if n_protected == 1 else 'are'} protected",
        )
    positives = round(o.batch.target * o.batch.positive_fraction)
    if not 1 <= positives <= o.batch.target - 1:
        raise PlanError(
            "optimize.batch.positive_fraction",
            f"a target batch of {o.batch.target} with positive_fraction {o.batch.positive_fraction} "
            f"has {positives} positives; it needs at least one positive and one negative",
        )
    if o.eval_every > o.steps:
        raise PlanError(
            "optimize.eval_every",
            f"must be at most steps ({o.steps}) (got {o.eval_every}); checkpoint selection needs "
            f"at least one evaluation during training",
        )
    if o.calibrate.target_offset:
        if o.method not in ("penalty", "lagrangian"):
            raise PlanError(
                "optimize.calibrate.target_offset",
                f"calibrates the constrained methods (penalty, lagrangian), but the method is "
                f"{o.method!r}; a baseline is kept as trained, so the setting would do nothing",
            )
    m = spec.model
    if set(m.freeze) == {"image", "text"} and not m.heads.enabled and not m.target_tower:
        raise PlanError("model.freeze", "both towers are frozen and the heads are disabled: nothing would be trained")


def _model_plan(spec: Spec, releases: tuple[Release, ...], lineage_read: bool = True) -> ModelPlan:
    m = spec.model
    checkpoint = _str(m.checkpoint)
    if m.from_ == "lineage" and (releases or lineage_read):
        assert spec.lineage is not None  # the spec's rule
        if not releases:
            raise PlanError(
                "model.from",
                f"the lineage at {spec.lineage.dir} has no release yet; its first cycle starts from a "
                f"'checkpoint' or 'pretrained' model",
            )
        checkpoint = str(Path(spec.lineage.dir) / releases[-1].model_file)
    return ModelPlan(
        arch=m.arch,
        pretrained=m.pretrained,
        checkpoint=checkpoint,
        heads=m.heads.enabled,
        rank=m.heads.rank,
        device=m.device,
        precision=m.precision,
        freeze=tuple(m.freeze),
        target_tower=m.target_tower,
    )


def _optimizer_plan(spec: Spec) -> OptimizerPlan:
    o = spec.optimize
    return OptimizerPlan(
        method=o.method,
        baselines=tuple(o.baselines),
        steps=o.steps,
        seed=o.seed,
        lr=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        batch=BatchPlan(
            target=o.batch.target,
            positive_fraction=o.batch.positive_fraction,
            protected_classes=o.batch.protected_classes,
            per_class=o.batch.per_class,
        ),
        gamma=o.gamma,
        constraint_tau=o.constraint_tau,
        temperature=o.temperature,
        penalty=PenaltyPlan(beta=o.penalty.beta, schedule=o.penalty.schedule, form=o.penalty.form),
        lagrangian=LagrangianPlan(
            multiplier_lr=o.lagrangian.multiplier_lr, rho=o.lagrangian.rho, max_multiplier=o.lagrangian.max_multiplier
        ),
        wise_ft=WiseFtPlan(grid=o.wise_ft.grid),
        eval_every=o.eval_every,
        checkpoint_every=o.checkpoint_every,
        calibrate=CalibratePlan(target_offset=o.calibrate.target_offset),
        select=SelectPlan(min_certify_probability=o.select.min_certify_probability),
        store_views=o.store_views,
        target_views=o.target_views,
    )


def load_plan(path: str | os.PathLike, *, check_files: bool = True) -> tuple[Spec, Plan]:
    """:func:`~safespec.spec.load_spec` then :func:`compile_spec`; a plan error is located in the file too
    (at the field it is about)."""
    spec, locate = read_spec(path, check_files=check_files)
    releases: tuple[Release, ...] = ()
    if spec.lineage is not None and check_files:  # the registry is data: a lint without data does not read it
        try:
            releases = tuple(Registry.open(spec.lineage.dir).releases)
        except LineageError as e:
            raise SpecError([locate("lineage.dir", str(e))]) from None
    try:
        plan = compile_spec(spec, releases, lineage_read=check_files)
    except PlanError as e:
        raise SpecError([locate(e.field, e.message)]) from None
    return spec, plan
