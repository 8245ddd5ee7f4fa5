"""The JUnit channel: one test case per capability and one for the target goal, so that CI systems show
a release's verdict where they show test results."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from ..result import meets
from .charts import (
    clean,
    conf,
    is_number,
    pct,
    pp,
    sub,
)
from .view import _needed_text

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: Any) -> str:
    """XML 1.0 cannot carry control characters at all, escaped or not."""
    return _XML_INVALID.sub("\ufffd", str(text))


def _cap_message(c: dict[str, Any]) -> str:
    needed = ""
    if c["status"] != "certified":
        needed = f"; needed n {_needed_text(c)}"
    bound = c.get("drop_upper_bound")
    rel = "<=" if is_number(bound) and bound <= c["tolerance"] else ">"
    return (
        f"{c['status']}: accuracy {pct(c.get('old_accuracy'))} -> {pct(c.get('new_accuracy'))} "
        f"({pp(c.get('accuracy_change', sub(c.get('new_accuracy'), c.get('old_accuracy'))), 1, True)}); "
        f"drop upper bound {pp(bound, 2)} {rel} tolerance {pp(c['tolerance'], 2)} at {conf(c['confidence'])} "
        f"confidence; n={c['n']}{needed}"
    )


def _target_message(t: dict[str, Any]) -> str:
    goal = t.get("goal") or {}
    parts = []
    if is_number(goal.get("min_accuracy")):
        parts.append(f"accuracy >= {pct(goal['min_accuracy'])}")
    if is_number(goal.get("min_improvement")):
        parts.append(f"improvement >= {pp(goal['min_improvement'], 1, True)}")
    interval = t.get("improvement_interval")
    iv = f" [{pp(interval[0], 1, True)}, {pp(interval[1], 1, True)}]" if interval else ""
    improvement = t.get("improvement", sub(t.get("new_accuracy"), t.get("old_accuracy")))
    return (
        f"goal {'met' if t['goal_met'] else 'not met'}: accuracy {pct(t.get('old_accuracy'))} -> "
        f"{pct(t.get('new_accuracy'))} ({pp(improvement, 1, True)}{iv}); "
        f"goal {' and '.join(parts) if parts else 'not recorded'}"
    )


def render_junit(result: dict[str, Any]) -> str:
    """One test case per protected capability and one for the target, so CI lists them."""
    require = result.get("require", "certified")
    spec = result.get("spec") or {}
    suite_name = f"safespec.{clean(spec.get('name') or 'run')}"
    caps = result["capabilities"]
    target = result["target"]
    failures = sum(1 for c in caps if not meets(c["status"], require)) + (0 if target["goal_met"] else 1)
    tests = len(caps) + 1
    prov = result.get("provenance") or {}
    root = ET.Element(
        "testsuites", {"name": "safespec", "tests": str(tests), "failures": str(failures), "errors": "0", "time": "0"}
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": _x(suite_name),
            "tests": str(tests),
            "failures": str(failures),
            "errors": "0",
            "skipped": "0",
            "time": "0",
        },
    )
    if prov.get("finished"):
        suite.set("timestamp", _x(prov["finished"]))
    props = ET.SubElement(suite, "properties")
    for k, v in (
        ("verdict", result["verdict"]),
        ("require", require),
        ("method", result.get("method")),
        ("spec_digest", spec.get("digest") or prov.get("spec_digest")),
    ):
        if v is not None:
            ET.SubElement(props, "property", {"name": k, "value": _x(v)})
    for c in caps:
        case = ET.SubElement(
            suite, "testcase", {"classname": _x(f"{suite_name}.protected"), "name": _x(clean(c["name"])), "time": "0"}
        )
        msg = _x(_cap_message(c))
        if meets(c["status"], require):
            ET.SubElement(case, "system-out").text = msg
        else:
            fail = ET.SubElement(case, "failure", {"message": msg, "type": _x(c["status"])})
            fail.text = (
                msg
                + f"\nrequired: every protected capability {require}"
                + (" or certified" if require == "preserved" else "")
            )
    case = ET.SubElement(
        suite,
        "testcase",
        {"classname": _x(f"{suite_name}.target"), "name": _x(f"target {clean(target['class'])}"), "time": "0"},
    )
    msg = _x(_target_message(target))
    if target["goal_met"]:
        ET.SubElement(case, "system-out").text = msg
    else:
        ET.SubElement(case, "failure", {"message": msg, "type": "goal_not_met"}).text = msg
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
