"""Jinja2 templates of the audit report (installed as safespec.templates)."""
