"""The terminal channel: the summary `safespec run` and `safespec report` print."""

from __future__ import annotations

from typing import Any

from ..result import STATUSES, meets
from .charts import (
    clean,
    is_number,
    pct,
    pp,
    sub,
)
from .view import _needed_text

SUMMARY_MAX_CAPABILITIES = 20
SUMMARY_MAX_NOT_MET = 30


_ANSI = {
    "certified": "\x1b[32m",
    "preserved": "\x1b[33m",
    "violated": "\x1b[31m",
    "inconclusive": "\x1b[35m",
    "bold": "\x1b[1m",
    "reset": "\x1b[0m",
    "dim": "\x1b[2m",
}


def summary_text(result: dict[str, Any], color: bool = False) -> str:
    """The one-screen terminal summary: the verdict, then one line per capability and the target."""

    def paint(text: str, style: str) -> str:
        return f"{_ANSI[style]}{text}{_ANSI['reset']}" if color else text

    require = result.get("require", "certified")
    caps = result["capabilities"]
    met = [c for c in caps if meets(c["status"], require)]
    not_met = [c for c in caps if not meets(c["status"], require)]
    spec = result.get("spec") or {}
    verdict = result["verdict"]
    head = "CERTIFIED" if verdict == "certified" else "NOT CERTIFIED"
    style = "certified" if verdict == "certified" else "violated"
    if verdict == "certified" and not (result.get("target") or {}).get("goal_met"):
        head, style = "CERTIFIED, TARGET GOAL NOT MET (not releasable)", "preserved"
    first = f"{paint('safespec:', 'bold')} {paint(head, style)}"
    budgets = [c for c in caps if "against" in c]  # a lineage's drift budgets, certified like capabilities
    own = len(caps) - len(budgets)
    met_own = sum(1 for c in met if "against" not in c)
    counted = f"{met_own} of {own} protected capabilities"
    if budgets:
        counted += f" and {len(met) - met_own} of {len(budgets)} budgets"
    first += (
        f"  {clean(spec.get('name') or 'run', 40)}: {counted} "
        f"{require}{' or better' if require == 'preserved' else ''} (method {result.get('method')})"
    )
    lines = [first]
    if len(caps) > SUMMARY_MAX_CAPABILITIES:
        shown = not_met[:SUMMARY_MAX_NOT_MET]
    else:
        shown = caps
    width = min(28, max([len(clean(c["name"])) for c in shown] + [len(clean(result["target"]["class"])), 6]))
    for c in shown:
        status = c["status"]
        name = clean(c["name"], width).ljust(width)
        bound = c.get("drop_upper_bound")
        rel = "<=" if is_number(bound) and bound <= c["tolerance"] else "> "
        change = c.get("accuracy_change", sub(c.get("new_accuracy"), c.get("old_accuracy")))
        line = (
            f"  {paint(status.ljust(12), status)} {name}  {pct(c.get('old_accuracy')):>6} -> "
            f"{pct(c.get('new_accuracy')):>6} ({pp(change, 1, True):>9})  drop bound "
            f"{pp(bound, 2):>8} {rel} tol {pp(c['tolerance'], 2)}  n={c['n']}"
        )
        if status != "certified":
            line += f"  needed n={_needed_text(c, short=True)}"
        lines.append(line)
    if len(caps) > SUMMARY_MAX_CAPABILITIES:
        if len(not_met) > len(shown):
            lines.append(f"  ... and {len(not_met) - len(shown)} more not {require}")
        by_status = ", ".join(
            f"{sum(1 for c in met if c['status'] == s)} {s}" for s in STATUSES if any(c["status"] == s for c in met)
        )
        lines.append(
            f"  + {len(met)} more meeting the requirement ({by_status or 'none'})"
            if met
            else "  (no capability meets the requirement)"
        )
    t = result["target"]
    goal_word = "goal met" if t["goal_met"] else "goal NOT met"
    interval = t.get("improvement_interval")
    iv = f" [{pp(interval[0], 1, True)}, {pp(interval[1], 1, True)}]" if interval else ""
    improvement = t.get("improvement", sub(t.get("new_accuracy"), t.get("old_accuracy")))
    lines.append(
        f"  {paint('target'.ljust(12), 'bold')} {clean(t['class'], width).ljust(width)}  "
        f"{pct(t.get('old_accuracy')):>6} -> {pct(t.get('new_accuracy')):>6} "
        f"({pp(improvement, 1, True):>9}){iv}  "
        f"{paint(goal_word, 'certified' if t['goal_met'] else 'violated')}"
    )
    sel = result.get("selection") or {}
    blocked = sel.get("blocked") or {}
    if sel.get("fell_back_to_old") or (sel.get("step") == 0 and blocked.get("summary")):
        what = "kept the old model" if sel.get("fell_back_to_old") else "kept the old model with a target offset"
        lines.append(
            f"  {paint('selection', 'bold')}: {what}"
            + (f": {clean(blocked['summary'], 400)}" if blocked.get("summary") else "")
        )
    return "\n".join(lines)
