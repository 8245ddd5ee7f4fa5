"""Malformed specs: every one must give exit 2 and exactly one located, human line, never a traceback.

The fixtures in tests/specs/bad/ each start with ``# expect: LINE PATH | FRAGMENT``: the line the error
must point at, the field path it must name (``-`` for YAML-level errors, which have none) and a piece
of the message. Byte-level cases (empty, binary, non-UTF-8) are written here, since a header comment
would change what they test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from safespec.cli import main
from safespec.errors import SpecError
from safespec.plan import load_plan
from safespec.spec import load_spec

SPECS = Path(__file__).parent / "specs"
BAD = sorted((SPECS / "bad").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+) (\S+) \| (.+)$")


def _validate(path: Path | str):
    return CliRunner().invoke(main, ["validate", str(path)])


def _single_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_there_are_enough_malformed_specs():
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_spec(path: Path):
    m = EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert m, f"{path.name} lacks its '# expect:' header"
    line_no, field, fragment = int(m.group(1)), m.group(2), m.group(3)

    line = _single_error_line(_validate(path))

    assert line.startswith(f"{path}:{line_no}:"), line
    col = re.match(rf"{re.escape(str(path))}:{line_no}:(\d+): ", line)
    assert col and int(col.group(1)) >= 1, line
    if field != "-":
        assert f": {field}: " in line, line
    assert fragment in line, line


@pytest.mark.parametrize("path", BAD[:5], ids=[p.stem for p in BAD[:5]])
def test_library_raises_the_same_line(path: Path):
    """The CLI only prints what the library says: load_plan raises SpecError with that one line."""
    with pytest.raises(SpecError) as info:
        load_plan(path)
    assert len(info.value.lines) == 1
    assert info.value.lines[0] == _single_error_line(_validate(path))


def test_crlf_line_endings_keep_line_numbers(tmp_path: Path):
    src = SPECS / "bad" / "tolerance-above-one.yaml"
    (tmp_path / "data").mkdir()
    crlf = tmp_path / "bad" / "crlf.yaml"
    crlf.parent.mkdir()
    crlf.write_bytes(src.read_bytes().replace(b"\n", b"\r\n"))
    for f in (SPECS / "data").iterdir():
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
    line = _single_error_line(_validate(crlf))
    assert line.startswith(f"{crlf}:20:5: protect[1].tolerance: must be between 0 and 1 (got 1.5)")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty spec"),
        (b"# only a comment\n\n", "empty spec"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        (b"safespec: 1\nname: caf\xe9\n", "not UTF-8"),
    ],
    ids=["empty", "comments-only", "binary", "latin-1"],
)
def test_unreadable_files(tmp_path: Path, content: bytes, fragment: str):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    line = _single_error_line(_validate(path))
    assert line.startswith(f"{path}:"), line
    assert fragment in line
    if fragment == "not UTF-8":
        assert line.startswith(f"{path}:2:10:"), line  # the byte 0xe9 on line 2, column 10


def test_missing_spec_file_and_folder(tmp_path: Path):
    line = _single_error_line(_validate(tmp_path / "nope.yaml"))
    assert line == f"{tmp_path / 'nope.yaml'}: no such file"
    line = _single_error_line(_validate(tmp_path))
    assert "is a folder" in line


def test_alias_bomb_is_refused_quickly(tmp_path: Path):
    lines = ["safespec: 1", 'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    line = _single_error_line(_validate(path))
    assert "more than" in line and "alias" in line


def test_recursive_alias_is_refused(tmp_path: Path):
    path = tmp_path / "loop.yaml"
    path.write_text("safespec: 1\nname: &x [a, *x]\n")
    line = _single_error_line(_validate(path))
    assert "recursive" in line


def _with_data(tmp_path: Path, text: str) -> Path:
    """A spec beside a copy of the stand-in manifests."""
    shutil.copytree(SPECS / "data", tmp_path / "data")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_several_problems_give_one_line_each_in_file_order(tmp_path: Path):
    text = (SPECS / "good.yaml").read_text()
    text = text.replace("    tolerance: 0.05\n", "    tolerance: 2\n").replace("  steps: 100\n", "  steps: lots\n")
    text = text.replace("  arch: ViT-B-16\n", "  arch: ViT-B-16\n  colour: red\n")
    result = _validate(_with_data(tmp_path, text))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    numbers = [int(line.split(":")[1]) for line in lines]
    assert numbers == sorted(numbers)
    assert ": model.colour: unknown key 'colour'" in lines[0]
    assert ": protect[1].tolerance: must be between 0 and 1 (got 2)" in lines[1]
    assert ": optimize.steps: must be a whole number (got 'lots')" in lines[2]


def test_data_errors_name_every_missing_split(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text((SPECS / "good.yaml").read_text())
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = info.value.lines
    assert [re.search(r": (data\.\w+): ", x).group(1) for x in lines] == [
        "data.protected",
        "data.target",
        "data.validation",
        "data.heldout",
    ]
    assert all(str(tmp_path / "data") in x and "not found" in x for x in lines)
    # the lines point at each field's own line in the file
    text = path.read_text().splitlines()
    for x in lines:
        n = int(x.split(":")[1])
        assert text[n - 1].lstrip().startswith(re.search(r": data\.(\w+): ", x).group(1) + ":")


def test_certify_test_names_a_known_test(tmp_path: Path):
    """certify.test is 'exact' (the default) or 'score'; anything else is one located line naming the choices."""
    good = (SPECS / "good.yaml").read_text()
    assert "certify:" not in good
    text = good + "certify:\n  confidence: 0.95\n  test: exakt\n"
    path = _with_data(tmp_path / "bad", text)
    line = _single_error_line(_validate(path))
    assert line == (
        f"{path}:{len(text.splitlines())}:3: certify.test: must be one of 'exact', 'score' "
        f"(got 'exakt'); did you mean 'exact'?"
    ), line
    line = _single_error_line(_validate(_with_data(tmp_path / "number", good + "certify:\n  test: 1\n")))
    assert ": certify.test: must be one of 'exact', 'score' (got 1)" in line
    for test in ("exact", "score"):
        assert load_plan(_with_data(tmp_path / test, good + f"certify:\n  test: {test}\n"))[1].certify.test == test
    assert load_plan(_with_data(tmp_path / "default", good))[1].certify.test == "exact"
