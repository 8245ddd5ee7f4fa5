"""Spec files: YAML text -> validated :class:`~safespec.spec.Spec`, with errors a person can act on.

Every problem becomes one line ``FILE:LINE:COL: path.to[2].field: message (got VALUE)``. The line
numbers come from the YAML nodes, so the YAML is *composed* (never constructed: no object of any tag
is ever built) and turned into plain data by :func:`_Reader` while it records where each value sits.

Scalars follow the YAML 1.2 core schema, as editors and the JSON Schema tooling do: ``1e-4`` is a
number, ``no``/``on`` are strings (a class called ``no`` stays a class), and only ``true``/``false``
are booleans. Tags other than the core ones are rejected rather than interpreted.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .compile import Plan, PlanError, compile_spec
from .errors import SpecError
from .spec import SPEC_VERSION, Spec

__all__ = ["STARTER_DATA", "load_plan", "load_spec", "parse_spec", "read_spec_data", "spec_digest", "starter_spec"]

Loc = tuple  # a path into the document: str keys and int indices

_MAX_NODES = 200_000  # alias bombs ("billion laughs") expand into this many values at most
_MAX_BYTES = 10 * 2**20


# ------------------------------------------------------------------------------------------- reading
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the module docstring)."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


for _tag, _regexp, _first in [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.nan|\.NaN|\.NAN)$",
     list("-+0123456789.")),
]:
    _Loader.add_implicit_resolver(_tag, re.compile(_regexp), _first)

_STR, _NULL, _BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "null", "bool", "int", "float"))
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


def _scalar(node: yaml.ScalarNode) -> Any:
    v = node.value
    if node.tag == _STR:
        return v
    if node.tag == _NULL:
        return None
    if node.tag == _BOOL:
        return v.lower() == "true"
    if node.tag == _INT:
        if v.startswith("0o"):
            return int(v[2:], 8)
        if v.startswith("0x"):
            return int(v[2:], 16)
        return int(v, 10)
    if node.tag == _FLOAT:
        low = v.lower()
        if low.endswith(".inf"):
            return float("-inf") if low.startswith("-") else float("inf")
        if low == ".nan":
            return float("nan")
        return float(v)
    raise _Problem(node.start_mark, f"unsupported YAML tag {_tag_name(node.tag)!r}; a spec holds only plain strings, "
                                    f"numbers, booleans, lists and mappings")


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


class _Problem(Exception):
    """One located problem found while reading the YAML (before validation)."""

    def __init__(self, mark: yaml.Mark | None, message: str, loc: Loc = ()):
        super().__init__(message)
        self.mark, self.message, self.loc = mark, message, loc


@dataclass
class _Doc:
    """The plain data of a spec file and where every value (and every mapping key) sits in it."""

    display: str  # the file name as the user gave it
    data: Any
    values: dict[Loc, yaml.Mark] = field(default_factory=dict)
    keys: dict[Loc, yaml.Mark] = field(default_factory=dict)
    root: yaml.Mark | None = None

    def mark(self, loc: Loc) -> yaml.Mark | None:
        """The mark of the longest prefix of ``loc`` that is in the file (a missing field: its parent)."""
        for n in range(len(loc), 0, -1):
            prefix = tuple(loc[:n])
            if prefix in self.keys:
                return self.keys[prefix]  # a mapping entry: its key starts the line that names the field
            if prefix in self.values:
                return self.values[prefix]
        return self.root

    def line(self, loc: Loc, message: str) -> str:
        return _format(self.display, self.mark(loc), loc, message)


def _format(display: str, mark: yaml.Mark | None, loc: Loc, message: str) -> str:
    where = f"{display}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{display}:1:1"
    path = _dotted(loc)
    return f"{where}: {path}: {message}" if path else f"{where}: {message}"


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Reader:
    """Walks a composed node tree into plain data, recording marks and rejecting duplicate keys."""

    def __init__(self, doc: _Doc):
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()  # nodes on the current path, to catch recursive aliases

    def read(self, node: yaml.Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            raise _Problem(node.start_mark, f"more than {_MAX_NODES} values (an alias expanding exponentially?)")
        self.doc.values[loc] = node.start_mark
        if isinstance(node, yaml.ScalarNode):
            try:
                return _scalar(node)
            except _Problem as p:
                raise _Problem(p.mark, p.message, loc) from None
        if id(node) in self.active:
            raise _Problem(node.start_mark, "an alias refers to a node that contains it (a recursive structure)", loc)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ:
                    raise _Problem(node.start_mark, f"unsupported YAML tag {_tag_name(node.tag)!r}", loc)
                return [self.read(item, loc + (i,)) for i, item in enumerate(node.value)]
            if node.tag != _MAP:
                raise _Problem(node.start_mark, f"unsupported YAML tag {_tag_name(node.tag)!r}", loc)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode) or knode.tag not in (_STR, _INT, _BOOL, _NULL, _FLOAT):
                    raise _Problem(knode.start_mark, "keys must be plain words, not lists or mappings", loc)
                key = knode.value
                if key == "<<":
                    raise _Problem(knode.start_mark, "merge keys ('<<') are not supported; write the keys out", loc)
                kloc = loc + (key,)
                if key in out:
                    first = self.doc.keys[kloc]
                    raise _Problem(knode.start_mark, f"duplicate key {key!r} (first defined at line {first.line + 1})", kloc)
                self.doc.keys[kloc] = knode.start_mark
                out[key] = self.read(vnode, kloc)
            return out
        finally:
            self.active.discard(id(node))


def _yaml_error_line(display: str, err: yaml.YAMLError) -> str:
    """One line for a PyYAML error, at the problem's mark; tabs get a plain explanation."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"{display}:1:1: not a text file PyYAML can read ({err.reason}, character {err.character!r} at byte {err.position})"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = (err.problem or "").strip()
        if "'\\t'" in problem:
            message = "tab character: YAML indentation must use spaces, not tabs"
        else:
            context = (err.context or "").strip()
            at = f" at line {err.context_mark.line + 1}" if err.context_mark is not None else ""
            if context and problem.startswith("but "):
                message = f"YAML syntax error: {context}{at}, {problem}"
            else:
                message = f"YAML syntax error: {problem}" if problem else "YAML syntax error"
                if context and err.context_mark is not mark:
                    message += f" ({context}{at})"
        return _format(display, mark, (), message)
    return f"{display}:1:1: YAML error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def _read_text(path: Path, display: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([f"{display}: no such file"]) from None
    except IsADirectoryError:
        raise SpecError([f"{display}: is a folder; expected a YAML spec file"]) from None
    except OSError as e:
        raise SpecError([f"{display}: cannot read: {e.strerror or e}"]) from None
    return _decode(raw, display)


def _decode(raw: bytes, display: str) -> str:
    if len(raw) > _MAX_BYTES:
        raise SpecError([f"{display}:1:1: file is {len(raw)} bytes; a spec is at most {_MAX_BYTES} bytes"])
    if b"\x00" in raw[:8192]:
        raise SpecError([f"{display}:1:1: binary file (it contains NUL bytes); expected a YAML text spec"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError([f"{display}:{line}:{col}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the spec as UTF-8"]) from None
    return text


def _read_doc(text: str, display: str) -> _Doc:
    doc = _Doc(display=display, data=None)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise SpecError([_yaml_error_line(display, e)]) from None
    except RecursionError:
        raise SpecError([f"{display}:1:1: nested too deeply to be a spec"]) from None
    if root is None:
        raise SpecError([f"{display}:1:1: empty spec; expected a mapping that starts with 'safespec: {SPEC_VERSION}' "
                         f"(run 'safespec init' for a starter spec)"])
    doc.root = root.start_mark
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise SpecError([_format(display, root.start_mark, (), f"the spec must be a mapping of keys to values (got {kind})")])
    try:
        doc.data = _Reader(doc).read(root, ())
    except _Problem as p:
        raise SpecError([_format(display, p.mark, p.loc, p.message)]) from None
    except RecursionError:
        raise SpecError([f"{display}:1:1: nested too deeply to be a spec"]) from None
    return doc


def read_spec_data(path: str | os.PathLike) -> Any:
    """The spec file's plain data (YAML 1.2 core scalars), before validation; e.g. to check it against
    the JSON Schema. Raises :class:`SpecError` for files that are not a YAML mapping."""
    display = str(path)
    return _read_doc(_read_text(Path(path), display), display).data


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
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list",
    "dict_type": "must be a mapping of keys to values", "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values", "path_type": "must be a file path (a string)",
}
_PATTERN_WORDS = {
    ("name",): "must start with a letter or digit and use only letters, digits, '.', '_' and '-'",
    ("model", "device"): "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
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
            entries.append(((mark.line if mark else 0), (mark.column if mark else 0),
                            _format(doc.display, mark, loc, f"must be {message} (got {_show(value)})")))
        for e in chosen:
            mark = doc.mark(loc)
            entries.append(((mark.line if mark else 0), (mark.column if mark else 0),
                            _format(doc.display, mark, loc, _message(e, loc, doc))))
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


# -------------------------------------------------------------------------------------------- checks
_DATA_FIELDS = ("protected", "target", "validation", "heldout", "base")


def _file_problems(spec: Spec, doc: _Doc, base: Path) -> list[str]:
    """Missing or unreadable data files and checkpoint, each with the field, its line and the path tried."""
    lines: list[str] = []

    def check(loc: Loc, written: Path | None, resolved: Path | None, *, allow_dir: bool) -> None:
        if written is None or resolved is None:
            return
        note = "" if written.is_absolute() else f" (from {str(written)!r}, relative to the spec's folder)"
        if not resolved.exists():
            lines.append(doc.line(loc, f"not found: {resolved}{note}"))
        elif resolved.is_dir():
            if not allow_dir:
                lines.append(doc.line(loc, f"is a folder, expected a checkpoint file: {resolved}"))
            elif not os.access(resolved, os.R_OK | os.X_OK):
                lines.append(doc.line(loc, f"folder is not readable: {resolved}"))
        elif allow_dir and resolved.suffix.lower() != ".csv":
            lines.append(doc.line(loc, f"must be a CSV manifest (.csv) or a folder with one sub-folder per class "
                                       f"(got {resolved.name!r}): {resolved}"))
        else:
            try:
                with open(resolved, "rb") as f:
                    f.read(1)
            except OSError as e:
                lines.append(doc.line(loc, f"cannot read {resolved}: {e.strerror or e}"))

    resolved = spec.resolve(base)
    check(("model", "checkpoint"), spec.model.checkpoint, resolved.model.checkpoint, allow_dir=False)
    for key in _DATA_FIELDS:
        check(("data", key), getattr(spec.data, key), getattr(resolved.data, key), allow_dir=True)
    return lines


# ---------------------------------------------------------------------------------------------- API
def _validate(doc: _Doc) -> Spec:
    data = doc.data
    version = data.get("safespec", SPEC_VERSION) if isinstance(data, dict) else SPEC_VERSION
    if type(version) is not int or version != SPEC_VERSION:
        # A spec of another language version: its other keys cannot be judged, so say only this.
        raise SpecError([doc.line(("safespec",), f"unsupported spec language version {_show(version)}; this safespec "
                                                 f"reads version {SPEC_VERSION} (write 'safespec: {SPEC_VERSION}')")])
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_validation_lines(e, doc)) from None


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


def parse_spec(text: str | bytes, *, filename: str = "<spec>", base: str | os.PathLike | None = None,
               check_files: bool = False) -> Spec:
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


def load_spec(path: str | os.PathLike, *, check_files: bool = True) -> Spec:
    """Read, validate and resolve a spec file.

    Relative paths (data splits, checkpoint) come back anchored at the spec's folder (absolute). With
    ``check_files`` (the default) every data split must exist as a readable CSV file or folder and the
    checkpoint as a readable file; ``check_files=False`` is for linting a spec whose data lives elsewhere.
    Raises :class:`~safespec.errors.SpecError` with one ``FILE:LINE:COL: field: message`` line per problem.
    """
    spec, _, base = _load(path, check_files)
    return spec.resolve(base)


def load_plan(path: str | os.PathLike, *, check_files: bool = True) -> tuple[Spec, Plan]:
    """:func:`load_spec` then :func:`~safespec.compile.compile_spec`; plan errors are located in the file too."""
    spec, doc, base = _load(path, check_files)
    resolved = spec.resolve(base)
    try:
        plan = compile_spec(resolved)
    except PlanError as e:
        raise SpecError([doc.line(_parse_loc(e.field), e.message)]) from None
    return resolved, plan


def spec_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the file's bytes: the same value ``sha256sum`` gives a reviewer."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from None
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- starter
STARTER_DATA = ("data/protected.csv", "data/target.csv", "data/validation.csv", "data/heldout.csv")


def starter_spec(name: str = "my-cycle") -> str:
    """A commented starter spec (what ``safespec init`` writes); it validates once its data exists."""
    return _STARTER.format(name=name, version=SPEC_VERSION, protected=STARTER_DATA[0], target=STARTER_DATA[1],
                           validation=STARTER_DATA[2], heldout=STARTER_DATA[3])


_STARTER = """\
# A safespec release spec (spec language version {version}).
# Check it with:   safespec validate THIS_FILE
# See the plan:    safespec compile THIS_FILE
# Editor help: `safespec schema --output safespec.schema.json`, then make the first line of this file
#   "# yaml-language-server: $schema=./safespec.schema.json" (VS Code's YAML extension reads it).
safespec: {version}
name: {name}
description: >-
  Improve the 'dog' class while keeping every other class as accurate as before.

# The old model: an open_clip architecture and exactly one source of weights,
# 'pretrained' (an open_clip tag or 'hf-hub:org/name') or 'checkpoint' (a local file).
model:
  arch: ViT-B-16
  pretrained: openai
  # checkpoint: models/old.safetensors
  heads:
    enabled: true
    rank: 32
  target_tower: true  # the target trains its own copy of the image tower; every other class keeps its logits
  device: auto        # auto, cpu, cuda, cuda:N or mps

# Class names in label order; manifests label rows with these names.
classes:
  names: [cat, dog, horse]
  templates:
    - "a photo of a {{}}."

# One CSV manifest (path,label[,caption]; image paths relative to the manifest) or one folder
# with a sub-folder per class, for each split. Paths are relative to this file.
data:
  protected: {protected}      # stored examples of the protected classes
  target: {target}            # target training set: target rows are positives, others negatives
  validation: {validation}    # checkpoint selection
  heldout: {heldout}          # certification only; never seen by training

# What must not get worse. 'tolerance' is the largest accepted drop of held-out accuracy.
protect:
  - classes: others           # every class except the target...
    each: true                # ...each as its own capability
    tolerance: 0.03
    constraint:               # how training keeps it (the demo's settings; bench/RESULTS.md)
      metric: focal-distill   # KL from the old model's prediction, weighted up where it was right
      slack: 0.003            # nats per stored image

# What must get better.
target:
  class: dog
  goal:
    min_improvement: 0.05     # held-out accuracy gain over the old model

optimize:
  method: lagrangian          # exact multipliers; penalty (the paper's), or a baseline
  objective: ce
  steps: 300
  lr: 1.0e-5                  # a pretrained model; the demo's small model trained from scratch uses 1e-4
  warmup_steps: 30
  batch:
    target: 64
    protected_classes: 2      # protected classes drawn per step
    per_class: 10
  constraint_tau: 0.2         # the constraints' temperature
  store_views: 2              # fixed augmented copies of the store, constrained with it
  lagrangian:
    multiplier_lr: 500
  calibrate:
    target_offset: true       # an offset of the target's logit, chosen on validation
  select:
    min_certify_probability: 0.8   # predicted chance that every held-out certificate passes
  eval_every: 50
  checkpoint_every: 50

certify:
  confidence: 0.95
  require: certified          # or 'preserved' (point estimates only)

report:
  dir: out/{name}
"""
