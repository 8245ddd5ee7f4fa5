"""Exports of a finished run directory to other systems, after the run is complete: read from result.json and
the files beside it only, like the report (no model, no torch, no training). ``mlflow``: an MLflow run, and a
model version for a release (docs/mlflow.md). MLflow itself is imported only when an export runs."""

from __future__ import annotations

from .mlflow import INSTALL_HINT, ExportError, MlflowExport, export_mlflow, registration_refusal, require_mlflow
from .weights import safetensors_digest

__all__ = [
    "INSTALL_HINT",
    "ExportError",
    "MlflowExport",
    "export_mlflow",
    "registration_refusal",
    "require_mlflow",
    "safetensors_digest",
]
