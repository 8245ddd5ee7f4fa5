"""The certificate stage: paired old/new predictions on the held-out split -> per-capability statuses and
a verdict, with the statistics behind them. It never depends on how a model was trained (no torch, no
training code): a certificate can be recomputed from predictions, or from result.json's counts alone.

Modules: ``certificate`` (counts, statuses, the verdict), ``stats`` (the statistical API, one place to
import from), and behind it ``base``, ``score`` (Tango's score test), ``exact`` (the exact unconditional
test), ``binomial`` (Clopper-Pearson) and ``power`` (operating curves and sample sizes)."""

from __future__ import annotations

from ..result import STATUSES  # defined once, with the typed result the certificate fills
from . import stats
from .certificate import (
    NEEDED_N_POWER,
    STATISTICS,
    CapabilityResult,
    Certificate,
    ClassResult,
    PairedCounts,
    TargetResult,
    certify,
    certify_budgets,
    confusion_matrix,
    paired_counts,
    paired_from_correct,
    per_class_table,
    statistics,
    status_of,
)

__all__ = [
    "NEEDED_N_POWER",
    "STATISTICS",
    "STATUSES",
    "CapabilityResult",
    "Certificate",
    "ClassResult",
    "PairedCounts",
    "TargetResult",
    "certify",
    "certify_budgets",
    "confusion_matrix",
    "paired_counts",
    "paired_from_correct",
    "per_class_table",
    "statistics",
    "stats",
    "status_of",
]
