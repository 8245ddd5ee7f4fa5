"""The typed model of result.json (schema_version 1): what certify writes and report reads.

The models are the schema: ``safespec/result_schema.json`` is generated from them (``python -m
safespec.result``; a test keeps the shipped file equal to the generation), as ``safespec.schema.json`` is
generated from the spec models. Unknown fields are kept and ignored (a later minor release may add some).
The statuses, the rule that turns them into a verdict and the release decision live here once, so the
certificate, the report and the CLI cannot disagree about them. No torch, numpy or scipy: a report or a
release pipeline reads a result without them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

SCHEMA_VERSION = 1
#: A capability's status, best first (docs/statistics.md says what each means).
STATUSES: tuple[str, ...] = ("certified", "preserved", "violated", "inconclusive")
Status = Literal["certified", "preserved", "violated", "inconclusive"]
Verdict = Literal["certified", "not_certified"]
Require = Literal["certified", "preserved"]


def required_statuses(require: str) -> tuple[str, ...]:
    """The statuses that meet ``certify.require``: ``certified`` alone, or ``preserved`` too."""
    return ("certified",) if require == "certified" else ("certified", "preserved")


def meets(status: str | None, require: str) -> bool:
    return status in required_statuses(require)


# JSON's types, strictly: a number is not a string or a boolean, an integer is not 3.0
Proportion = Annotated[StrictFloat, Field(ge=0, le=1)]
Change = Annotated[StrictFloat, Field(ge=-1, le=1)]
Count = Annotated[StrictInt, Field(ge=0)]
Interval = Annotated[list[StrictFloat], Field(min_length=2, max_length=2)]


def _absent_or(**kw: Any) -> Any:
    """A field that may be left out but, when present, must not be null (its type says what it must be)."""
    return Field(default=None, **kw)


class _Part(BaseModel):
    """A part of result.json: strict JSON types, unknown fields kept and ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class SpecInfo(_Part):
    """The spec this run implemented."""

    name: StrictStr | None = None
    title: StrictStr | None = None
    description: StrictStr | None = None
    path: StrictStr | None = Field(None, description="The spec file as given on the command line.")
    digest: StrictStr | None = Field(None, description="sha256:<hex> of the spec file's bytes.")
    text: StrictStr | None = Field(None, description="The spec file's full text.")


class ClassCertificate(_Part):
    """One class of a capability, judged at the capability's tolerance and confidence."""

    class_: StrictStr = Field(alias="class")
    n: Count
    old_accuracy: Proportion | None = None
    new_accuracy: Proportion | None = None
    negative_flips: Count | None = None
    positive_flips: Count | None = None
    drop_upper_bound: Change | None = None
    status: Status | None = None


class CapabilityCertificate(_Part):
    """The certificate of one protected capability (docs/result-schema.md says what each field means)."""

    name: StrictStr
    classes: Annotated[list[StrictStr], Field(min_length=1)]
    status: Status
    meets_requirement: StrictBool = _absent_or(description="Must agree with status and require.")
    tolerance: Proportion = Field(description="The largest accepted drop of held-out accuracy.")
    confidence: Proportion
    n: Count = Field(description="Held-out images of the capability (all its classes).")
    old_accuracy: Proportion | None
    new_accuracy: Proportion | None
    accuracy_change: Change | None = None
    drop_upper_bound: Change | None = Field(
        description="One-sided upper confidence bound of the true drop, by the test statistics.test names."
    )
    new_accuracy_lower: Proportion | None = None
    flip_rate_upper: Proportion | None = None
    negative_flips: Count
    positive_flips: Count
    both_right: Count = _absent_or()
    both_wrong: Count = _absent_or()
    needed_n: Count | None = Field(
        description="Held-out images at which the same test would certify it with 80% probability."
    )
    per_class: list[ClassCertificate] = _absent_or()
    against: StrictStr = _absent_or(
        description="Set on a drift budget's certificate: the earlier release it is judged against (its tolerance is the budget)."
    )


class Goal(_Part):
    min_accuracy: StrictFloat | None = None
    min_improvement: StrictFloat | None = None


class TargetResult(_Part):
    """The class that had to improve."""

    class_: StrictStr = Field(alias="class")
    n: Count = _absent_or()
    old_accuracy: Proportion | None
    new_accuracy: Proportion | None
    improvement: Change | None = None
    improvement_interval: Interval | None = None
    new_accuracy_interval: Interval | None = None
    confidence: Proportion | None = None
    goal: Goal | None = None
    goal_met: StrictBool = Field(description="Whether the point estimates reach the goal.")
    goal_met_with_confidence: StrictBool | None = None


class ClassResult(_Part):
    """Held-out results of one class of the task."""

    class_: StrictStr = Field(alias="class")
    n: Count
    old_accuracy: Proportion | None = None
    new_accuracy: Proportion | None = None
    old_loss: StrictFloat | None = None
    new_loss: StrictFloat | None = None
    negative_flips: Count | None = None
    positive_flips: Count | None = None


class Confusion(_Part):
    """Held-out confusion matrices, ``M[true][predicted]``, in ``classes`` order."""

    old: list[list[Count]] = _absent_or()
    new: list[list[Count]] = _absent_or()


class Flip(_Part):
    """A negative flip for the reviewer to look at; ``path`` is a PNG inside the run directory."""

    class_: StrictStr = Field(alias="class")
    path: StrictStr | None
    source: StrictStr | None = None
    old_pred: StrictStr | None = None
    new_pred: StrictStr | None = None


class Selection(_Part):
    """How the new model was chosen among the training checkpoints (docs/selection.md)."""

    step: Count | None = None
    reason: StrictStr | None = None
    fell_back_to_old: StrictBool = _absent_or()
    target_offset: StrictFloat = _absent_or()
    target_rival_offsets: dict[StrictStr, StrictFloat] = _absent_or(
        description="optimize.calibrate.target_offset: per-rival: the target's offset against each rival "
        "class (cosine units), in place of target_offset."
    )
    min_certify_probability: Annotated[StrictFloat, Field(gt=0, lt=1)] = _absent_or()
    blocked: dict[str, Any] | None = None


class Training(_Part):
    steps: Count | None = None
    seconds: Annotated[StrictFloat, Field(ge=0)] | None = None
    trajectory: StrictStr | None = Field(None, description="The trajectory's file name inside the run directory.")


class BaselineCapability(_Part):
    name: StrictStr
    status: Status
    accuracy_change: Change | None = None
    drop_upper_bound: Change | None = None


class BaselineTarget(_Part):
    old_accuracy: Proportion | None = None
    new_accuracy: Proportion | None = None
    goal_met: StrictBool | None = None


class Baseline(_Part):
    """A baseline method, run and certified the same way, for comparison."""

    method: StrictStr
    verdict: Verdict | None = None
    error: StrictStr | None = Field(None, description="Set when the baseline could not be run.")
    capabilities: list[BaselineCapability] = _absent_or()
    target: BaselineTarget | None = None


class Provenance(_Part):
    """Digests, seed, versions, command and times."""

    spec_digest: StrictStr | None = None
    old_model: dict[str, StrictStr | None] | None = None
    new_model: dict[str, StrictStr | None] | None = None
    data: dict[str, StrictStr | None] | None = None
    seed: StrictInt | None = None
    versions: dict[str, StrictStr | None] | None = None
    command: StrictStr | None = None
    started: StrictStr | None = None
    finished: StrictStr | None = None
    host: StrictStr | None = None
    processes: Annotated[StrictInt, Field(ge=1)] | None = None


class LineageAncestor(_Part):
    """An earlier release of the lineage (0 is its origin)."""

    id: Count
    label: StrictStr
    digest: StrictStr


class LineageCarried(_Part):
    """A capability carried from an earlier release rather than written in the spec."""

    name: StrictStr
    classes: list[StrictStr]
    from_release: StrictStr = Field(description="The release that improved or certified it.")


class LineageBudget(_Part):
    """A capability's drift budget over the lineage: what it has lost against its best ancestor."""

    capability: StrictStr
    budget: Proportion
    status: Status = Field(description="The budget certificate's status (the capability '<name> (budget)').")
    against: StrictStr | None = Field(description="The ancestor that binds: the one the certificate is judged against.")
    accuracy: dict[str, Proportion | None] = Field(
        description="Held-out accuracy on this cycle's split, per ancestor label and 'new'."
    )
    used: Change | None = Field(description="The largest observed drop against any ancestor (0 when none).")
    left: Change | None = Field(description="budget - used.")


class LineageRelease(_Part):
    id: Count
    digest: StrictStr


class LineageResult(_Part):
    """The lineage this cycle continued (docs/lineage.md)."""

    dir: StrictStr
    ancestors: list[LineageAncestor]
    carried: list[LineageCarried]
    budgets: list[LineageBudget]
    accuracy: dict[str, dict[str, Proportion | None]] = _absent_or(
        description="Per model of the lineage (each ancestor's label, then 'new'), held-out accuracy per class on this cycle's split."
    )
    release: LineageRelease | None = Field(description="This run's release, when it was registered.")
    registration: StrictStr = Field(description="Why this run was, or was not, registered.")


class Result(_Part):
    """The certified outcome of one safespec development cycle."""

    schema_version: Literal[1]
    verdict: Verdict = Field(
        description="certified exactly when every protected capability meets require (intersection-union)."
    )
    require: Require = "certified"
    spec: SpecInfo = _absent_or()
    method: StrictStr
    classes: list[StrictStr] = _absent_or()
    capabilities: Annotated[list[CapabilityCertificate], Field(min_length=1)]
    target: TargetResult
    per_class: list[ClassResult] = _absent_or()
    confusion: Confusion | None = None
    flips: list[Flip] = _absent_or()
    selection: Selection | None = None
    training: Training | None = None
    baselines: list[Baseline] = _absent_or()
    statistics: dict[str, StrictStr] | None = None
    provenance: Provenance
    lineage: LineageResult | None = None

    def contradiction(self) -> str | None:
        """Why the verdict does not follow from the capabilities (intersection-union), or None."""
        all_meet = True
        for i, cap in enumerate(self.capabilities):
            ok = meets(cap.status, self.require)
            if cap.meets_requirement is not None and cap.meets_requirement != ok:
                return (
                    f"capabilities[{i}].meets_requirement: {cap.meets_requirement} contradicts status "
                    f"{cap.status!r} under require {self.require!r}"
                )
            all_meet &= ok
        if self.verdict == "certified" and not all_meet:
            return f"verdict: 'certified' contradicts the capabilities (not every one is {self.require!r} or better)"
        if self.verdict == "not_certified" and all_meet:
            return f"verdict: 'not_certified' contradicts the capabilities (every one meets {self.require!r})"
        return self._goal_contradiction()

    def _goal_contradiction(self) -> str | None:
        """Why target.goal_met does not follow from the target's accuracies and goal, or None. The release
        gate reads goal_met, so a hand-edited true must not open it. Accuracies are counts over n, so the
        check recovers the counts and compares as the certificate does."""
        t = self.target
        if t.goal is None or not t.n or t.old_accuracy is None or t.new_accuracy is None:
            return None
        old, new = round(t.old_accuracy * t.n), round(t.new_accuracy * t.n)
        min_acc, min_imp = t.goal.min_accuracy, t.goal.min_improvement
        met = (min_acc is None or new >= min_acc * t.n - 1e-9) and (
            min_imp is None or new - old >= min_imp * t.n - 1e-9
        )
        if met != t.goal_met:
            return (
                f"target.goal_met: {t.goal_met} contradicts the target's accuracies ({t.old_accuracy:.4f} -> "
                f"{t.new_accuracy:.4f} of n={t.n}) and its goal"
            )
        return None

    @property
    def release_ok(self) -> bool:
        """The release gate: every protected capability meets what the spec requires (the verdict) *and*
        the target reaches its goal; a model that keeps everything but improves nothing is not a release."""
        return self.verdict == "certified" and self.target.goal_met


# ------------------------------------------------------------------------------------------ checking
_EXPECTED = {
    "float_type": "expected a number",
    "int_type": "expected an integer",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "list_type": "expected an array",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
    "missing": "required field is missing",
}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("float", "int", "str", "bool") or str(part).startswith(("function-", "constrained-")):
            continue  # the branch of a union pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(e: Mapping[str, Any]) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind == "missing":
        return _EXPECTED[kind]
    if kind in _EXPECTED:
        text = _EXPECTED[kind]
    elif kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'|(\d+)", str(ctx.get("expected", "")))
        text = f"expected one of {', '.join(a or b for a, b in allowed)}"
    elif kind == "too_short":
        text = f"expected at least {ctx.get('min_length')} items"
    elif kind == "too_long":
        text = f"expected at most {ctx.get('max_length')} items"
    elif kind in ("greater_than_equal", "greater_than"):
        text = f"expected {'at least' if kind == 'greater_than_equal' else 'more than'} {ctx.get('ge', ctx.get('gt'))}"
    elif kind in ("less_than_equal", "less_than"):
        text = f"expected {'at most' if kind == 'less_than_equal' else 'less than'} {ctx.get('le', ctx.get('lt'))}"
    else:
        text = e["msg"]
    got = e.get("input")
    if isinstance(got, list):
        shown = f"{len(got)} item{'' if len(got) == 1 else 's'}"
    elif isinstance(got, dict):
        shown = "an object"
    else:
        shown = repr(got)[:60]
    return f"{text} (got {shown})"


def validate_result(obj: Any) -> list[str]:
    """Problems of a result.json object, each as ``field.path: message``; [] when it is valid. The
    verdict's consistency with the capabilities is checked too (a hand-edited "certified" is a problem)."""
    try:
        result = Result.model_validate(obj)
    except ValidationError as err:
        seen: dict[str, str] = {}
        for e in err.errors():
            where = _where(tuple(e["loc"]))
            if e["type"] == "none_required" or where in seen:
                continue  # the null branch of a nullable field: its other branch says what was expected
            seen[where] = _message(e)
        return [f"{w}: {m}" if w else m for w, m in seen.items()]
    why = result.contradiction()
    return [why] if why else []


def parse_result(obj: Any) -> Result:
    """The typed result, or a ValueError with the first problem (and how many more there are)."""
    problems = validate_result(obj)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    return Result.model_validate(obj)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of result.json, generated from :class:`Result`."""
    schema = Result.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "safespec-result-v1",
        **schema,
        "title": "safespec result.json, schema_version 1",
        "description": (
            "The certified outcome of one safespec development cycle. Fields not listed here may be added in "
            "later minor releases; readers must ignore unknown fields. See docs/result-schema.md."
        ),
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":  # python -m safespec.result > safespec/result_schema.json
    sys.stdout.write(schema_text())
