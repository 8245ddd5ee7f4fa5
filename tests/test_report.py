"""The audit outputs: report.html, junit.xml and the terminal summary, from synthetic run directories."""

from __future__ import annotations

import base64
import copy
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from safespec import report
from safespec.report import charts as report_charts
from safespec.report import terminal, view
from safespec.errors import RunError, SafespecError

from fixtures_report import MIXED, make_result, make_trajectory, many_capabilities, png_bytes, write_run

XSS = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Checks nesting (every element closed in order) and collects what the assertions look at."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.rows: list[list[str]] = []  # rows of <table class="caps">
        self._in_caps = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table" and a.get("class") == "caps":
            self._in_caps = True
        if self._in_caps and tag == "tr":
            self._row = []
        if self._in_caps and tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"line {self.getpos()[0]}: </{tag}> closes <{self.stack[-1] if self.stack else None}>")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if self._in_caps and tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        if self._in_caps and tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "table":
            self._in_caps = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    return p


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


def render(run_dir: Path) -> str:
    return report.render_html(report.load_run(run_dir))


# ----------------------------------------------------------------------------------------- html
def test_report_is_well_formed_and_lists_every_capability_with_its_status(run_dir: Path):
    paths = report.render_report(run_dir)
    html = paths["html"].read_text(encoding="utf-8")
    page = parse(html)
    assert page.errors == []
    assert page.stack == []
    result = json.loads((run_dir / "result.json").read_text())
    rows = {r[0].split(" ")[0]: r for r in page.rows[1:] if r}
    for cap in result["capabilities"]:
        assert cap["name"] in rows, cap["name"]
        assert cap["status"] in rows[cap["name"]], rows[cap["name"]]
    # the multi-class capability shows each of its classes beneath it
    assert "cow" in rows and "horse" in rows
    title = next(t for t in "".join(page.text).split("\n") if "NOT CERTIFIED" in t)
    assert "NOT CERTIFIED" in title
    assert 'class="banner not-certified"' in html


def test_report_draws_the_charts(run_dir: Path):
    html = render(run_dir)
    n_caps = len(MIXED)
    svgs = html.count("<svg")
    # forest + per-class intervals + target metric + training loss + one per constraint + u + multipliers + confusion
    assert svgs == 2 + 2 + n_caps + 2 + 1
    assert html.count("<polyline") >= 2 + n_caps + 2 * n_caps
    assert "Wilson" in html  # the caption says which interval the error bars are


def test_report_is_self_contained_and_has_no_script(run_dir: Path):
    html = render(run_dir)
    page = parse(html)
    assert not re.search(r"<\s*script", html, re.I)
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "href", "xlink:href", "action"):
                assert value.startswith("#") or value.startswith("data:image/png;base64,"), (tag, name, value[:40])
    assert "@import" not in html and "url(" not in html
    assert "<style>" in html and "@page" in html and "size: A4" in html


def test_flip_thumbnails_are_embedded_png(run_dir: Path):
    result = json.loads((run_dir / "result.json").read_text())
    page = parse(render(run_dir))
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == len(result["flips"]) > 0
    for a in imgs:
        data = base64.b64decode(a["src"].split(",", 1)[1])
        assert data.startswith(b"\x89PNG")


def test_thumbnail_paths_cannot_leave_the_run_directory(tmp_path: Path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(7))
    result = make_result(baselines=False)
    result["flips"] = [
        {"class": "lion", "path": "../secret.png", "source": "x", "old_pred": "lion", "new_pred": "dog"},
        {"class": "lion", "path": str(outside), "source": "y", "old_pred": "lion", "new_pred": "dog"},
        {"class": "lion", "path": "flips/not-a-png.png", "source": "z", "old_pred": "lion", "new_pred": "dog"},
        {"class": "lion", "path": "flips/ok.png", "source": "w", "old_pred": "lion", "new_pred": "dog"},
    ]
    run = write_run(tmp_path / "run", result, write_flips=False)
    (run / "flips").mkdir()
    (run / "flips" / "not-a-png.png").write_text("<svg onload=alert(1)>")
    (run / "flips" / "ok.png").write_bytes(png_bytes(1))
    page = parse(render(run))
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 1
    assert base64.b64decode(imgs[0]["src"].split(",", 1)[1]) == png_bytes(1)
    assert "".join(page.text).count("thumbnail missing") == 3


def test_strings_from_spec_manifest_and_files_are_escaped(tmp_path: Path):
    evil = [
        ("bear", [("bear", 400, 360, 4, 6)]),
        (XSS, [(XSS, 400, 320, 30, 6)]),
        ('x" onmouseover="alert(1)', [("cat", 400, 350, 5, 3)]),
    ]
    result = make_result(evil, target=(f"dog{XSS}", 400, 156, 10, 94))
    result["spec"].update(name=XSS, title=XSS, description=XSS, text=f"name: {XSS}", path=XSS, digest=XSS)
    result["method"] = XSS
    result["flips"].append({"class": XSS, "path": XSS, "source": XSS, "old_pred": XSS, "new_pred": XSS})
    result["baselines"][0]["method"] = XSS
    result["baselines"][1]["error"] = XSS
    result["selection"]["reason"] = XSS
    result["provenance"]["data"][XSS] = XSS
    result["provenance"]["versions"][XSS] = XSS
    result["provenance"]["command"] = XSS
    result["statistics"][XSS] = XSS
    traj = make_trajectory([c["name"] for c in result["capabilities"]])
    run = write_run(tmp_path / "run", result, trajectory=traj)
    html = report.render_report(run)["html"].read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = parse(html)
    assert page.errors == []
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    assert XSS in "".join(page.text)  # shown to the reader as text
    junit = report.render_junit(result)
    root = ET.fromstring(junit)
    assert any(tc.get("name") == XSS for tc in root.iter("testcase"))


def test_many_capabilities_render_with_aggregated_charts(tmp_path: Path):
    result = make_result(many_capabilities(365), flips_per_class=1, baselines=False)
    run = write_run(tmp_path / "run", result)
    html = render(run)
    page = parse(html)
    assert page.errors == []
    rows = [r for r in page.rows[1:] if r]
    assert len(rows) == 365
    not_met = [c for c in result["capabilities"] if not c["meets_requirement"]]
    assert 0 < len(not_met) < 365
    # the ones a reviewer must act on come first
    assert [r[0] for r in rows[: len(not_met)]] == [c["name"] for c in not_met]
    assert "aggregated per evaluation" in html
    assert html.count('class="chart wide"') == 2  # forest and the worst-classes intervals: capped, not 365 rows
    svgs = html.count("<svg")
    # forest + intervals + scatter + target + loss + constraint aggregate + capped small multiples + u + multipliers
    assert svgs == 3 + 2 + 1 + view.MAX_SMALL_MULTIPLES + 2


def test_run_without_training_renders(tmp_path: Path):
    result = make_result(baselines=False)
    result["training"] = None
    result["selection"] = None
    run = write_run(tmp_path / "run", result, trajectory=[])
    html = render(run)
    assert "No training trajectory" in html
    assert parse(html).errors == []


def test_fell_back_to_old_is_called_out(tmp_path: Path):
    result = make_result()
    result["selection"]["fell_back_to_old"] = True
    html = render(write_run(tmp_path / "run", result))
    assert "fell back to the old model" in html and "What blocked it" not in html
    # with the record of what blocked selection, the report and the terminal summary both say it
    result["selection"]["blocked"] = {"summary": "step 50 was refused: 'cat' <blocked> it most", "capability": "cat"}
    html = render(write_run(tmp_path / "run2", result))
    assert "What blocked it: step 50 was refused: &#39;cat&#39; &lt;blocked&gt; it most" in html
    assert "kept the old model: step 50 was refused: 'cat' <blocked> it most" in report.summary_text(result)
    # v1 with only a target offset selected (not a fallback): the refused checkpoints are still explained
    result["selection"].update(fell_back_to_old=False, step=0, target_offset=0.03)
    html = render(write_run(tmp_path / "run3", result))
    assert "No trained checkpoint qualified" in html and "What blocked the trained checkpoints" in html
    assert "kept the old model with a target offset: step 50" in report.summary_text(result)


def test_certified_run_has_green_banner_and_passing_junit(tmp_path: Path):
    good = [(n, [(n, 400, 360, 2, 4)]) for n in ("bear", "cat", "cow")]
    result = make_result(good)
    assert result["verdict"] == "certified"
    run = write_run(tmp_path / "run", result)
    out = report.render_report(run)
    html = out["html"].read_text()
    assert 'class="banner certified"' in html and "NOT CERTIFIED" not in html
    root = ET.parse(out["junit"]).getroot()
    assert root.get("failures") == "0"
    assert not list(root.iter("failure"))


# ---------------------------------------------------------------------------------------- junit
def test_junit_has_one_case_per_capability_and_the_target(run_dir: Path):
    result = json.loads((run_dir / "result.json").read_text())
    root = ET.fromstring(report.render_junit(result))
    cases = list(root.iter("testcase"))
    assert len(cases) == len(result["capabilities"]) + 1
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    expected = {c["name"] for c in result["capabilities"] if c["status"] != "certified"}
    assert set(failed) == expected  # the target goal is met in this run
    suite = root.find("testsuite")
    assert suite.get("tests") == str(len(cases)) and suite.get("failures") == str(len(expected))
    lion = failed["lion"]
    assert lion.get("type") == "violated"
    msg = lion.get("message")
    assert "violated" in msg and "tolerance 3.00 pp" in msg and "> tolerance" in msg and "n=400" in msg
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["verdict"] == "not_certified"


def test_junit_target_failure_and_control_characters(run_dir: Path):
    result = json.loads((run_dir / "result.json").read_text())
    result["target"]["goal_met"] = False
    result["capabilities"][0]["name"] = "bell\x07cat"
    root = ET.fromstring(report.render_junit(result))
    target = [c for c in root.iter("testcase") if c.get("classname").endswith(".target")]
    assert len(target) == 1 and target[0].find("failure").get("type") == "goal_not_met"
    assert any("\ufffd" in c.get("name") for c in root.iter("testcase"))


def test_preserved_requirement_passes_preserved_capabilities(tmp_path: Path):
    caps = [("deer", [("deer", 400, 300, 14, 4)]), ("bear", [("bear", 400, 360, 4, 6)])]
    result = make_result(caps, require="preserved")
    assert [c["status"] for c in result["capabilities"]] == ["preserved", "certified"]
    assert result["verdict"] == "certified"
    root = ET.fromstring(report.render_junit(result))
    assert root.get("failures") == "0"
    assert report.summary_text(result).splitlines()[0].startswith("safespec: CERTIFIED")


# -------------------------------------------------------------------------------------- summary
def test_summary_has_verdict_one_line_per_capability_and_target(run_dir: Path):
    result = json.loads((run_dir / "result.json").read_text())
    lines = report.summary_text(result).splitlines()
    assert lines[0].startswith("safespec: NOT CERTIFIED")
    assert "5 of 9" in lines[0]
    assert len(lines) == 1 + len(result["capabilities"]) + 1
    for line, cap in zip(lines[1:], result["capabilities"]):
        assert line.split()[0] == cap["status"] and line.split()[1] == cap["name"]
        assert f"n={cap['n']}" in line
    lion = next(l for l in lines if " lion " in l)
    assert "80.0% ->  74.0%" in lion and "> " in lion and "needed n=unreachable" in lion
    assert lines[-1].split()[:2] == ["target", "dog"] and "goal met" in lines[-1]
    assert "\x1b[" not in "\n".join(lines)
    colored = report.summary_text(result, color=True)
    assert "\x1b[31m" in colored and "\x1b[32m" in colored


def test_summary_of_many_capabilities_fits_a_screen():
    result = make_result(many_capabilities(365), baselines=False)
    not_met = [c for c in result["capabilities"] if not c["meets_requirement"]]
    lines = report.summary_text(result).splitlines()
    assert len(lines) <= 1 + terminal.SUMMARY_MAX_NOT_MET + 2 + 1
    shown = [l.split()[1] for l in lines[1:] if l.split()[0] in report.STATUSES]
    assert shown == [c["name"] for c in not_met][: terminal.SUMMARY_MAX_NOT_MET]
    assert f"+ {365 - len(not_met)} more meeting the requirement" in "\n".join(lines)


# ------------------------------------------------------------------------------------- loading
def _one_line_error(run_dir: Path) -> str:
    with pytest.raises(RunError) as e:
        report.load_run(run_dir)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, SafespecError)
    return msg


def test_failed_run_is_refused_with_its_reason(tmp_path: Path):
    run = write_run(tmp_path / "run", state={"state": "failed", "reason": "CUDA out of memory\nat step 300"})
    msg = _one_line_error(run)
    assert "failed" in msg and "CUDA out of memory at step 300" in msg and "state.json" in msg
    with pytest.raises(RunError):
        report.render_report(run)
    assert not (run / "report.html").exists() and not (run / "junit.xml").exists()


def test_unfinished_run_is_refused_except_by_the_runner_finishing_it(tmp_path: Path):
    run = write_run(tmp_path / "run", state={"state": "running", "reason": None})
    assert "not finished" in _one_line_error(run)
    # the runner renders before it writes state.json "complete" (written last)
    assert report.render_report(run, finishing=True)["html"].exists()
    failed = write_run(tmp_path / "failed", state={"state": "failed", "reason": "interrupted"})
    with pytest.raises(RunError, match="failed"):
        report.render_report(failed, finishing=True)
    odd = write_run(tmp_path / "odd", state={"state": "done"})
    assert "expected one of running, failed, complete" in _one_line_error(odd)


def test_missing_and_corrupt_result(tmp_path: Path):
    run = write_run(tmp_path / "run")
    (run / "result.json").unlink()
    msg = _one_line_error(run)
    assert str(run / "result.json") in msg and "not found" in msg
    (run / "result.json").write_text('{"schema_version": 1,\n  "verdict": }')
    msg = _one_line_error(run)
    assert f"{run / 'result.json'}:2:" in msg and "not valid JSON" in msg
    assert "no such run directory" in _one_line_error(tmp_path / "nope")


def test_unsupported_schema_version(tmp_path: Path):
    result = make_result()
    result["schema_version"] = 2
    msg = _one_line_error(write_run(tmp_path / "run", result))
    assert "schema_version" in msg and "got 2" in msg


def test_invalid_fields_are_named(tmp_path: Path):
    result = make_result()
    result["capabilities"][3]["status"] = "fine"
    msg = _one_line_error(write_run(tmp_path / "a", result))
    assert "capabilities[3].status" in msg and "certified, preserved, violated, inconclusive" in msg
    result = make_result()
    del result["target"]["goal_met"]
    result["capabilities"][0]["n"] = -1
    msg = _one_line_error(write_run(tmp_path / "b", result))
    assert "capabilities[0].n" in msg and "1 more problems" in msg


def test_verdict_that_contradicts_its_capabilities_is_refused(tmp_path: Path):
    result = make_result()
    result["verdict"] = "certified"  # lion is violated
    msg = _one_line_error(write_run(tmp_path / "a", result))
    assert "verdict" in msg and "contradicts" in msg
    result = make_result()
    lion = next(c for c in result["capabilities"] if c["name"] == "lion")
    lion["meets_requirement"] = True
    msg = _one_line_error(write_run(tmp_path / "b", result))
    assert "meets_requirement" in msg and "violated" in msg


def test_a_goal_met_that_contradicts_the_targets_accuracies_is_refused(tmp_path: Path):
    """The release gate reads target.goal_met: a hand-edited true over accuracies short of the goal fails
    closed, and so does a false over accuracies that reach it."""
    result = make_result()
    t = result["target"]
    assert report.validate_result(result) == [] and t["goal_met"] is True
    t["goal"]["min_improvement"] = 0.5  # beyond the target's improvement, with goal_met still true
    msg = _one_line_error(write_run(tmp_path / "a", result))
    assert "target.goal_met: True contradicts" in msg
    result = make_result()
    result["target"]["goal_met"] = False  # the goal (+0.15) is reached
    msg = _one_line_error(write_run(tmp_path / "b", result))
    assert "target.goal_met: False contradicts" in msg
    result = make_result()
    t = result["target"]
    t["goal"] = {"min_accuracy": None, "min_improvement": round(t["new_accuracy"] - t["old_accuracy"], 6)}
    t["goal_met"] = True  # exactly at the goal: met, as the certificate counts it
    assert report.validate_result(result) == []


def test_trajectory_errors_and_resume_duplicates(tmp_path: Path):
    result = make_result()
    names = [c["name"] for c in result["capabilities"]]
    traj = make_trajectory(names, evals=4)
    resumed = traj[:3] + [dict(traj[2], target_metric=0.99)] + traj[3:]  # step 200 logged again after a resume
    run = write_run(tmp_path / "run", result, trajectory=resumed)
    loaded = report.load_run(run)
    assert [t["step"] for t in loaded.trajectory] == [0, 100, 200, 300]
    assert loaded.trajectory[2]["target_metric"] == 0.99
    with open(run / "trajectory.jsonl", "a") as f:
        f.write("{not json\n")
    msg = _one_line_error(run)
    assert "trajectory.jsonl:6:" in msg


# ------------------------------------------------------------------------------------ schema & stats
def test_synthetic_results_match_the_shipped_schema():
    assert report.validate_result(make_result()) == []
    assert report.validate_result(make_result(many_capabilities(30))) == []
    schema = report.result_schema()
    defs = schema.get("$defs", {})
    seen = []

    def walk(s, where="$"):
        if "$ref" in s:
            s = defs[s["$ref"].rsplit("/", 1)[1]]
        for branch in s.get("anyOf", ()):
            walk(branch, where)
        for key in s.get("required", ()):
            assert key in s.get("properties", {}), f"{where}: required {key} not described"
        for k, sub in s.get("properties", {}).items():
            seen.append(f"{where}.{k}")
            walk(sub, f"{where}.{k}")
        if isinstance(s.get("items"), dict):
            walk(s["items"], f"{where}[]")

    walk(schema)
    # the generated schema reaches every nested part (refs resolved)
    assert {"$.capabilities[].per_class[].status", "$.target.goal.min_improvement", "$.provenance.seed"} <= set(seen)


def test_the_shipped_schema_is_the_generated_one():
    """safespec/result_schema.json is what the typed result generates (python -m safespec.result)."""
    from importlib import resources

    from safespec.result import schema_text

    shipped = resources.files("safespec").joinpath("result_schema.json").read_text(encoding="utf-8")
    assert shipped == schema_text(), "regenerate: python -m safespec.result > safespec/result_schema.json"


def test_the_release_decision_is_a_property_of_the_result():
    from safespec.cli import release_ok
    from safespec.result import parse_result

    ok = make_result()
    ok["verdict"] = "certified"
    for c in ok["capabilities"]:
        c["status"], c["meets_requirement"] = "certified", True
    ok["target"]["goal_met"] = True
    assert parse_result(ok).release_ok and release_ok(ok)
    no_goal = copy.deepcopy(ok)
    no_goal["target"]["goal"]["min_improvement"] = 0.5  # beyond the target's +0.21: the goal is missed
    no_goal["target"]["goal_met"] = False
    assert not parse_result(no_goal).release_ok and not release_ok(no_goal)
    forged = copy.deepcopy(ok)
    forged["capabilities"][0]["status"] = "violated"  # the verdict no longer follows: no release, fail closed
    forged["capabilities"][0]["meets_requirement"] = False
    with pytest.raises(ValueError, match="verdict: 'certified' contradicts"):
        parse_result(forged)
    assert not release_ok(forged)


def test_schema_checker_rejects_wrong_types():
    bad = copy.deepcopy(make_result())
    bad["capabilities"][0]["old_accuracy"] = "0.9"
    bad["capabilities"][1]["negative_flips"] = True
    bad["target"]["improvement_interval"] = [0.1]
    problems = report.validate_result(bad)
    assert "capabilities[0].old_accuracy: expected a number (got '0.9')" in problems
    assert "capabilities[1].negative_flips: expected an integer (got True)" in problems
    assert "target.improvement_interval: expected at least 2 items (got 1 item)" in problems


def test_wilson_interval_known_values():
    lo, hi = report_charts.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = report_charts.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert report_charts.wilson_interval(3, 0) is None


def test_nice_ticks_cover_the_range():
    assert report_charts.nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = report_charts.nice_ticks(-0.013, 0.021, 4)
    assert ticks[0] >= -0.013 and ticks[-1] <= 0.021 and 0.0 in ticks


def test_certificate_from_certify_matches_the_schema_and_renders(tmp_path: Path):
    """Contract with certify.py: the fragment it writes into result.json is what the report reads."""
    import numpy as np

    from safespec.certify import certify
    from safespec.plan import compile_spec
    from safespec.spec import Spec

    names = ["a", "b", "c", "d", "e", "f", "g"]
    spec = Spec.model_validate(
        {
            "safespec": 1,
            "name": "contract",
            "model": {"arch": "x", "pretrained": "openai"},
            "classes": {"names": names},
            "data": {"protected": "p.csv", "target": "t.csv", "validation": "v.csv", "heldout": "h.csv"},
            "protect": [
                {"classes": ["a", "b"], "name": "ab", "tolerance": 0.03},
                {"classes": ["c", "d", "e", "f"], "each": True, "tolerance": 0.03},
            ],
            "target": {"class": "g", "goal": {"min_improvement": 0.1}},
            "optimize": {"steps": 100, "warmup_steps": 0},
        }
    )
    plan = compile_spec(spec)
    # per class: (both right, old right only, new right only, both wrong); "f" has no held-out images
    tables = {
        "a": (390, 2, 2, 6),
        "b": (380, 8, 2, 10),
        "c": (360, 20, 2, 18),
        "d": (50, 0, 0, 0),
        "e": (30, 0, 15, 5),
        "g": (35, 5, 25, 35),
    }
    labels, old, new = [], [], []
    for name, (rr, rw, wr, ww) in tables.items():
        y = names.index(name)
        other = (y + 1) % len(names)
        for o, nw, count in ((y, y, rr), (y, other, rw), (other, y, wr), (other, (y + 2) % len(names), ww)):
            labels += [y] * count
            old += [o] * count
            new += [nw] * count
    cert = certify(plan, *(np.asarray(a) for a in (labels, old, new))).to_dict()
    result = make_result(baselines=False)
    result.update(cert)
    result["classes"] = names
    result["per_class"] = [
        {"class": n, "n": sum(tables.get(n, (0,))), "old_accuracy": None, "new_accuracy": None} for n in names
    ]
    result["confusion"] = None
    result["flips"] = []
    assert report.validate_result(result) == []
    run = write_run(tmp_path / "run", result, trajectory=[])
    page = parse(report.render_report(run)["html"].read_text())
    assert page.errors == []
    rows = {r[0].split(" ")[0]: r for r in page.rows[1:] if r}
    for cap in cert["capabilities"]:
        assert cap["status"] in rows[cap["name"]]
    assert {c["status"] for c in cert["capabilities"]} >= {"certified", "violated", "inconclusive"}


def test_the_documented_minimal_example_is_valid():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "result-schema.md").read_text(encoding="utf-8")
    block = doc.split("## A minimal valid example", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    example = json.loads(block)
    assert report.validate_result(example) == []
    assert report.summary_text(example).startswith("safespec: NOT CERTIFIED")
    assert ET.fromstring(report.render_junit(example)).get("failures") == "1"


def test_remove_report_clears_stale_outputs(run_dir: Path):
    report.render_report(run_dir)
    removed = report.remove_report(run_dir)
    assert sorted(p.name for p in removed) == ["junit.xml", "report.html"]
    assert not (run_dir / "report.html").exists() and (run_dir / "result.json").exists()
    assert report.remove_report(run_dir) == []


def test_trajectory_path_must_stay_in_the_run_directory(tmp_path: Path):
    result = make_result()
    result["training"]["trajectory"] = "../../etc/passwd"
    msg = _one_line_error(write_run(tmp_path / "run", result))
    assert "training.trajectory" in msg and "inside the run directory" in msg


def test_a_certified_run_whose_target_missed_its_goal_is_marked_not_releasable(tmp_path):
    result = make_result([(n, [(n, 400, 360, 2, 4)]) for n in ("bear", "cat", "cow")])
    assert result["verdict"] == "certified"
    result["target"]["goal"]["min_improvement"] = 0.5  # beyond the target's improvement
    result["target"]["goal_met"] = False
    html = report.render_html(report.load_run(write_run(tmp_path / "run", result)))
    assert 'class="banner goal-missed"' in html and "TARGET GOAL NOT MET" in html and "Not releasable" in html
    assert "not releasable" in report.summary_text(result).splitlines()[0]


def test_a_calibrated_run_charts_its_selection_score_beside_the_raw_target():
    from safespec.report.view import _training_charts

    traj = [{"step": s, "target_metric": 0.3 + s / 1000, "train_loss": 1.0} for s in (0, 100, 200)]
    assert len(_training_charts(traj, 100)["target"]["series"]) == 1
    calibrated = [dict(t, target_calibrated=t["target_metric"] - 0.05, target_offset=-0.01) for t in traj]
    series = _training_charts(calibrated, 100)["target"]["series"]
    assert [s["label"] for s in series] == ["target metric", "with the calibrated offset"]


def test_the_documented_fields_are_the_typed_ones():
    """docs/result-schema.md's tables name exactly the fields of the typed result (no field documented that
    the models lack, none typed that the docs leave out)."""
    import re

    from safespec.result import CapabilityCertificate, Result, TargetResult

    doc = (Path(__file__).resolve().parents[1] / "docs" / "result-schema.md").read_text(encoding="utf-8")

    def table(heading):
        part = doc.split(heading, 1)[1].split("\n#", 1)[0]
        return {f for row in re.findall(r"^\| (`[^|]+`) \|", part, re.M) for f in re.findall(r"`([a-z_]+)`", row)}

    def fields(model):
        return {f.alias or name for name, f in model.model_fields.items()}

    assert table("## Top level") == fields(Result)
    assert table("### `capabilities[]`") == fields(CapabilityCertificate)
    assert table("### `target`") == fields(TargetResult)


def test_optional_fields_that_were_never_nullable_still_refuse_null():
    """The generated schema accepts what the hand-kept one did: a field that may be left out is not
    thereby allowed to be null."""
    from safespec.result import validate_result

    ok = make_result()
    for where, key in (
        (lambda r: r["capabilities"][0], "both_right"),
        (lambda r: r["capabilities"][0], "meets_requirement"),
        (lambda r: r, "baselines"),
        (lambda r: r["target"], "n"),
    ):
        bad = copy.deepcopy(ok)
        where(bad)[key] = None
        assert any(f"{key}: expected" in p for p in validate_result(bad)), key
        gone = copy.deepcopy(ok)
        where(gone).pop(key, None)
        assert not [p for p in validate_result(gone) if key in p], key


def test_the_lineage_section_appears_only_for_a_cycle_in_a_lineage(run_dir: Path):
    """A run without a lineage has no lineage section; one with a lineage block shows its chain, a chart
    of each class across the releases and the budgets (with the one over budget marked)."""
    assert 'id="lineage"' not in render(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    classes = result["classes"]
    result["lineage"] = {
        "dir": "/registry",
        "ancestors": [{"id": 0, "label": "origin", "digest": "sha256:aaa"}],
        "carried": [{"name": classes[1], "classes": [classes[1]], "from_release": "release 1"}],
        "budgets": [
            {
                "capability": classes[1],
                "budget": 0.05,
                "status": "violated",
                "against": "origin",
                "accuracy": {"origin": 0.9, "new": 0.8},
                "used": 0.1,
                "left": -0.05,
            }
        ],
        "accuracy": {m: {c: 0.5 + 0.01 * i for i, c in enumerate(classes)} for m in ("origin", "new")},
        "release": None,
        "registration": "not registered: the verdict is not certified",
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    html = render(run_dir)
    section = html.split('<section id="lineage">', 1)[1].split("</section>", 1)[0]
    assert "sha256:aaa" in section and "this run (not registered)" in section and "<svg" in section
    assert "Not registered: the verdict is not certified" in section
    assert "-5.0 pp" in section and 'class="num neg"' in section and "(release 1)" in section
    assert parse(html).errors == []
