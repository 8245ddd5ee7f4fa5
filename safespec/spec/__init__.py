"""The spec stage: the language (pydantic models of spec language v1, its JSON Schema) and spec files
(YAML 1.2 with every value's line and column, one located line per problem, the data-file checks, the
starter spec). It knows nothing of torch, models or training; ``safespec.plan`` turns a spec into a plan.

Modules: ``models`` (the language), ``reader`` (YAML -> located data), ``messages`` (validation errors ->
lines), ``files`` (data-file checks), ``load`` (files -> validated, resolved specs), ``starter``."""

from __future__ import annotations

from .load import load_spec, parse_spec, parse_spec_data, read_spec, spec_digest
from .models import (
    JSON_SCHEMA_DIALECT,
    METHODS,
    MODEL_NAME_PATTERN,
    SPEC_VERSION,
    BatchSpec,
    CalibrateSpec,
    CertifySpec,
    ClassesSpec,
    ConstraintSpec,
    DataSpec,
    ExportSpec,
    GoalSpec,
    HeadsSpec,
    LagrangianSpec,
    LineageSpec,
    MlflowExportSpec,
    ModelSpec,
    OptimizeSpec,
    PenaltySpec,
    ProtectSpec,
    ReportSpec,
    SelectSpec,
    Spec,
    SpecPath,
    TargetSpec,
    WiseFTSpec,
    json_schema,
)
from .reader import read_spec_data
from .starter import STARTER_DATA, starter_spec

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "METHODS",
    "MODEL_NAME_PATTERN",
    "SPEC_VERSION",
    "STARTER_DATA",
    "BatchSpec",
    "CalibrateSpec",
    "CertifySpec",
    "ClassesSpec",
    "ConstraintSpec",
    "DataSpec",
    "ExportSpec",
    "GoalSpec",
    "HeadsSpec",
    "LagrangianSpec",
    "LineageSpec",
    "MlflowExportSpec",
    "ModelSpec",
    "OptimizeSpec",
    "PenaltySpec",
    "ProtectSpec",
    "ReportSpec",
    "SelectSpec",
    "Spec",
    "SpecPath",
    "TargetSpec",
    "WiseFTSpec",
    "json_schema",
    "load_spec",
    "parse_spec",
    "parse_spec_data",
    "read_spec",
    "read_spec_data",
    "spec_digest",
    "starter_spec",
]
