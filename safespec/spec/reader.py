"""YAML text -> plain data that remembers where each value sits.

The YAML is *composed* (never constructed: no object of any tag is ever built) and turned into plain data
by :class:`_Reader` while it records each value's line and column, so that every later problem can name
them. Scalars follow the YAML 1.2 core schema, as editors and the JSON Schema tooling do: ``1e-4`` is a
number, ``no``/``on`` are strings (a class called ``no`` stays a class), and only ``true``/``false`` are
booleans. Tags other than the core ones are rejected rather than interpreted."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import SpecError
from .models import SPEC_VERSION

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
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.nan|\.NaN|\.NAN)$",
        list("-+0123456789."),
    ),
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
    raise _Problem(
        node.start_mark,
        f"unsupported YAML tag {_tag_name(node.tag)!r}; a spec holds only plain strings, "
        f"numbers, booleans, lists and mappings",
    )


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
                    raise _Problem(
                        knode.start_mark, f"duplicate key {key!r} (first defined at line {first.line + 1})", kloc
                    )
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
        raise SpecError(
            [f"{display}:{line}:{col}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the spec as UTF-8"]
        ) from None
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
        raise SpecError(
            [
                f"{display}:1:1: empty spec; expected a mapping that starts with 'safespec: {SPEC_VERSION}' "
                f"(run 'safespec init' for a starter spec)"
            ]
        )
    doc.root = root.start_mark
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise SpecError(
            [_format(display, root.start_mark, (), f"the spec must be a mapping of keys to values (got {kind})")]
        )
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
