"""Spec files: YAML text -> validated, resolved :class:`~safespec.spec.Spec`, or one located line per
problem (:class:`~safespec.errors.SpecError`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import SpecError
from .files import _file_problems
from .messages import _parse_loc, _show, _validation_lines
from .models import SPEC_VERSION, Spec
from .reader import _decode, _Doc, _read_doc, _read_text


# ---------------------------------------------------------------------------------------------- API
def _validate(doc: _Doc) -> Spec:
    data = doc.data
    version = data.get("safespec", SPEC_VERSION) if isinstance(data, dict) else SPEC_VERSION
    if type(version) is not int or version != SPEC_VERSION:
        # A spec of another language version: its other keys cannot be judged, so say only this.
        raise SpecError(
            [
                doc.line(
                    ("safespec",),
                    f"unsupported spec language version {_show(version)}; this safespec "
                    f"reads version {SPEC_VERSION} (write 'safespec: {SPEC_VERSION}')",
                )
            ]
        )
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_validation_lines(e, doc)) from None


def read_spec(path: str | os.PathLike, *, check_files: bool = True) -> tuple[Spec, Callable[[str, str], str]]:
    """:func:`load_spec`, and a function that locates a later problem of a field ('optimize.steps') in the
    file: ``locate(field, message)`` is the one line ``FILE:LINE:COL: field: message``. The plan compiler's
    errors are about fields of the spec, and they are reported where the field is written."""
    spec, doc, base = _load(path, check_files)
    return spec.resolve(base), lambda field, message: doc.line(_parse_loc(field), message)


def _load(path: str | os.PathLike, check_files: bool) -> tuple[Spec, _Doc, Path]:
    display = str(path)
    path = Path(path)
    doc = _read_doc(_read_text(path, display), display)
    spec = _validate(doc)
    base = path.parent.absolute()
    if check_files:
        problems = _file_problems(spec, doc, base)
        if problems:
            raise SpecError(problems)
    return spec, doc, base


def parse_spec(
    text: str | bytes, *, filename: str = "<spec>", base: str | os.PathLike | None = None, check_files: bool = False
) -> Spec:
    """Validate spec text that is not (or not only) a file, e.g. an embedded spec; errors name ``filename``.

    With ``base`` the relative paths are resolved against it (and checked, with ``check_files``)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    doc = _read_doc(_decode(raw, filename), filename)
    spec = _validate(doc)
    if base is None:
        return spec
    base_path = Path(base).absolute()
    if check_files:
        problems = _file_problems(spec, doc, base_path)
        if problems:
            raise SpecError(problems)
    return spec.resolve(base_path)


def parse_spec_data(text: str | bytes, *, filename: str = "<spec>") -> Any:
    """Spec text's plain data (YAML 1.2 core scalars, as the spec language reads them), before validation: what
    a spec says even when this safespec's language no longer accepts all of it. Raises
    :class:`~safespec.errors.SpecError` for text that is not a YAML mapping."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return _read_doc(_decode(raw, filename), filename).data


def load_spec(path: str | os.PathLike, *, check_files: bool = True) -> Spec:
    """Read, validate and resolve a spec file.

    Relative paths (data splits, checkpoint) come back anchored at the spec's folder (absolute). With
    ``check_files`` (the default) every data split must exist as a readable CSV file or folder and the
    checkpoint as a readable file; ``check_files=False`` is for linting a spec whose data lives elsewhere.
    Raises :class:`~safespec.errors.SpecError` with one ``FILE:LINE:COL: field: message`` line per problem.
    """
    spec, _, base = _load(path, check_files)
    return spec.resolve(base)


def spec_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the file's bytes: the same value ``sha256sum`` gives a reviewer."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from None
    return "sha256:" + hashlib.sha256(data).hexdigest()
