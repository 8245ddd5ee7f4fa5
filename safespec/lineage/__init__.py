"""Development cycles as a lineage of releases: the registry (:mod:`.registry`) that records each certified
release, and what one cycle hands the next (the capabilities it carries, the ancestors budgets count against).
Plain files and JSON: nothing here imports torch."""

from .registry import CertifiedCapability, LineageError, Problem, Registry, Release, file_sha256, model_name

__all__ = ["CertifiedCapability", "LineageError", "Problem", "Registry", "Release", "file_sha256", "model_name"]
