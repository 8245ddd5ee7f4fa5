"""Pydantic's validation errors -> one line per problem that a person can act on:
``FILE:LINE:COL: path.to[2].field: message (got VALUE)``, with did-you-mean hints for misspelt keys and
values, the allowed range of a number and the section a misplaced key belongs in."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .models import Spec
from .reader import Loc, _Doc, _dotted, _format


# ------------------------------------------------------------------------------------ model knowledge
def _keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Field infos by the key a spec writes (the alias where there is one)."""
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _models_in(ann: Any) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models_in(a)]


def _literals_in(ann: Any) -> list[Any]:
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    return [x for a in typing.get_args(ann) for x in _literals_in(a)]


def _walk(loc: Loc) -> tuple[FieldInfo | None, type[BaseModel] | None] | None:
    """Follow ``loc`` through the spec models: the field its last key names and the model that field's
    value is validated as (None where unknown); list indices are skipped, an item shares its list's field."""
    model: type[BaseModel] | None = Spec
    info: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None:
            return None
        info = _keys(model).get(part)
        if info is None:
            return None
        inner = _models_in(info.annotation)
        model = inner[0] if inner else None
    return info, model


def _field_at(loc: Loc) -> FieldInfo | None:
    """The field that the last key of ``loc`` names (None where unknown)."""
    found = _walk(loc)
    return found[0] if found else None


def _section_of(loc: Loc) -> type[BaseModel] | None:
    """The model that a mapping at ``loc`` is validated as."""
    found = _walk(loc)
    return found[1] if found else None


def _all_keys() -> dict[str, list[str]]:
    """Every key anywhere in the spec language -> the dotted sections it belongs to (for 'belongs in')."""
    out: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for key, info in _keys(model).items():
            out.setdefault(key, []).append(prefix)
            for inner in _models_in(info.annotation):
                walk(inner, f"{prefix}.{key}" if prefix else key)

    walk(Spec, "")
    return out


def _bounds(info: FieldInfo | None) -> dict[str, float]:
    found: dict[str, float] = {}
    for m in info.metadata if info is not None else []:
        for k in ("ge", "gt", "le", "lt"):
            v = getattr(m, k, None)
            if v is not None:
                found[k] = v
    return found


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(b: dict[str, float]) -> str | None:
    lo = ("at least", b["ge"]) if "ge" in b else ("greater than", b["gt"]) if "gt" in b else None
    hi = ("at most", b["le"]) if "le" in b else ("less than", b["lt"]) if "lt" in b else None
    if lo and hi:
        if lo[0] == "at least" and hi[0] == "at most":
            return f"must be between {_num(lo[1])} and {_num(hi[1])}"
        return f"must be {lo[0]} {_num(lo[1])} and {hi[0]} {_num(hi[1])}"
    if lo or hi:
        word, v = lo or hi  # type: ignore[misc]
        return f"must be {word} {_num(v)}"
    return None


def _show(v: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ".nan" if v != v else ".inf" if v == float("inf") else "-.inf" if v == float("-inf") else repr(v)
    if isinstance(v, dict):
        return "a mapping"
    text = repr(v)
    if isinstance(v, list) and len(text) > 60:
        return f"a list of {len(v)}"
    return text if len(text) <= 60 else text[:57] + "...'"


# ------------------------------------------------------------------------------------------- messages
_TYPE_WORDS = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "path_type": "must be a file path (a string)",
}
_NAME_WORDS = "must start with a letter or digit and use only letters, digits, '.', '_' and '-'"
_PATTERN_WORDS = {
    ("name",): _NAME_WORDS,
    ("model", "device"): "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    ("export", "mlflow", "model_name"): _NAME_WORDS,
    ("export", "mlflow", "tracking_uri"): "must be a URI without spaces",
}


def _clean_loc(loc: tuple, data: Any) -> tuple[Loc, bool]:
    """Drop pydantic's union-member tags (``list[str]``, ``literal['others']``) from an error location;
    the flag says whether any were dropped."""
    out: list[Any] = []
    tagged = False
    cur = data
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(part)
            cur = cur[part] if isinstance(cur, list) and 0 <= part < len(cur) else None
        elif isinstance(part, str) and not any(ch in part for ch in "[]'()"):
            out.append(part)
            cur = cur.get(part) if isinstance(cur, dict) else None
        else:
            tagged = True
    return tuple(out), tagged


def _close_key(loc: Loc) -> str | None:
    """The known key of the section at ``loc[:-1]`` that the unknown key ``loc[-1]`` is probably a typo of."""
    key = str(loc[-1])
    section = _section_of(loc[:-1])
    known = list(_keys(section)) if section is not None else []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [k for k in known if k.lower() == key.lower()]
    return close[0] if close else None


def _message(err: dict[str, Any], loc: Loc, doc: _Doc) -> str:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    info = _field_at(loc)
    got = f" (got {_show(value)})"
    if kind == "spec_rule":
        return str(ctx.get("message", err["msg"]))
    if kind == "missing":
        section = info is not None and bool(_models_in(info.annotation))
        what = "section" if section else "field"
        key = loc[-1] if loc else "?"
        return f"required {what} is missing (add '{key}:')"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        owner = _section_of(loc[:-1])
        known = list(_keys(owner)) if owner is not None else []
        hint = ""
        close = _close_key(loc)
        if close:
            hint = f"; did you mean {close!r}?"
        else:
            here = _dotted(tuple(p for p in loc[:-1] if not isinstance(p, int)))
            elsewhere = [p for p in _all_keys().get(key, []) if p and p != here]
            if elsewhere:
                hint = f"; it belongs in '{elsewhere[0]}'"
            elif known:
                hint = f"; expected one of: {', '.join(known)}"
        return f"unknown key {key!r}{hint}"
    if kind == "literal_error":
        options = _literals_in(info.annotation) if info is not None else []
        text = "must be one of " + ", ".join(repr(o) for o in options) if options else f"must be {ctx.get('expected')}"
        hint = ""
        if isinstance(value, str) and options:
            near = difflib.get_close_matches(value, [str(o) for o in options], n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{text}{got}{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = _range_text(_bounds(info))
        text = bounds if bounds is not None else err["msg"].replace("Input should be", "must be")
        return text + got
    if kind in ("too_short", "too_long"):
        n = len(value) if isinstance(value, (list, str)) else None
        if kind == "too_short":
            least = ctx.get("min_length", 1)
            return f"needs at least {least} item{'s' if least != 1 else ''}" + (f" (got {n})" if n is not None else "")
        return f"allows at most {ctx.get('max_length')} items" + (f" (got {n})" if n is not None else "")
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(tuple(p for p in loc if not isinstance(p, int)))
        return (words or f"must match the pattern {ctx.get('pattern')}") + got
    if kind in _TYPE_WORDS:
        text = _TYPE_WORDS[kind]
        if kind == "string_type" and (value is None or isinstance(value, (bool, int, float))):
            return f"{text}{got}; put it in quotes if you mean the text {_show(value)!r}"
        return f"{text}{got}"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return msg
    msg = str(err["msg"])
    return (msg[:1].lower() + msg[1:]).replace("input should be", "must be") + got


def _validation_lines(exc: ValidationError, doc: _Doc) -> list[str]:
    """One line per problem, sorted by position; members of one union failing together make one line."""
    groups: dict[Loc, list[tuple[dict[str, Any], bool]]] = {}
    for err in exc.errors(include_url=False):
        loc, tagged = _clean_loc(tuple(err["loc"]), doc.data)
        ctx = err.get("ctx") or {}
        if err["type"] == "spec_rule":
            loc = loc + tuple(ctx.get("rule_loc", ()))
        groups.setdefault(loc, []).append((dict(err), tagged))
    # A misspelt required key is one problem, not two: "unknown 'tolerence'; did you mean 'tolerance'?"
    # already says what the "'tolerance' is missing" error would.
    for loc, errs in list(groups.items()):
        if any(e["type"] == "extra_forbidden" for e, _ in errs):
            close = _close_key(loc)
            typo_of = loc[:-1] + (close,) if close else None
            if typo_of in groups:
                kept = [(e, t) for e, t in groups[typo_of] if e["type"] != "missing"]
                if kept:
                    groups[typo_of] = kept
                else:
                    del groups[typo_of]
    entries: list[tuple[int, int, str]] = []
    for loc, errs in groups.items():
        untagged = [e for e, tagged in errs if not tagged]
        if untagged:
            chosen = untagged
        else:
            # every member of a union failed: one line naming what would have been accepted
            parts = [_message(e, loc, doc).split(" (got ")[0] for e, _ in errs]
            value = errs[0][0].get("input")
            message = " or ".join(dict.fromkeys(p.removeprefix("must be ") for p in parts))
            chosen = []
            mark = doc.mark(loc)
            entries.append(
                (
                    (mark.line if mark else 0),
                    (mark.column if mark else 0),
                    _format(doc.display, mark, loc, f"must be {message} (got {_show(value)})"),
                )
            )
        for e in chosen:
            mark = doc.mark(loc)
            entries.append(
                (
                    (mark.line if mark else 0),
                    (mark.column if mark else 0),
                    _format(doc.display, mark, loc, _message(e, loc, doc)),
                )
            )
    entries.sort(key=lambda t: (t[0], t[1]))
    return list(dict.fromkeys(line for _, _, line in entries))


def _parse_loc(dotted: str) -> Loc:
    """'protect[3].name' -> ('protect', 3, 'name')."""
    out: list[Any] = []
    for part in dotted.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if not m:
            out.append(part)
            continue
        if m.group(1):
            out.append(m.group(1))
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(out)
