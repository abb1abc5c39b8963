"""Rule files: rfm-5 loads; bad files are refused naming file, dotted path and line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from rules.ruleset import PRESETS_DIR, load
from schemas.errors import RulesetError
from streams.tools.cli import main

RFM5 = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")


def test_rfm5_loads_as_documented() -> None:
    rs = load("rfm-5")
    assert (rs.id, rs.version, rs.timezone, rs.currency, rs.window_days) == ("rfm-5", "1", "Asia/Shanghai", "CNY", 365)
    assert [b.max for b in rs.scores["r"].bands] == [7, 30, 60, 120]
    assert [b.min for b in rs.scores["m"].bands] == [Decimal(50000), Decimal(20000), Decimal(5000), Decimal(1000)]
    ladder = rs.ladders["value"]
    assert ladder.grades == ["S", "A", "B", "C", "D"] and ladder.key == ["S", "A"]
    assert ladder.decide.bands is not None
    assert [(b.min, b.grade) for b in ladder.decide.bands] == [(13, "S"), (10, "A"), (7, "B"), (5, "C")]
    assert ladder.decide.otherwise == "D"


def _line(text: str, snippet: str) -> int:
    index = text.index(snippet)
    assert text.count(snippet) == 1, snippet
    return text.count("\n", 0, index) + 1


# (what is wrong, text replaced, replacement, line marker in the new text, dotted path, words in the message)
BAD = [
    ("unknown grade in a band", "{min: 7, grade: B}", "{min: 7, grade: Q}", "grade: Q",
     "ladders.value.decide.bands.2.grade", "'Q'"),
    ("key grade not in grades", "key: [S, A]", "key: [S, X]", "key: [S, X]", "ladders.value.key.1", "'X'"),
    ("unknown else grade", "else: D", "else: Z", "else: Z", "ladders.value.decide.else", "'Z'"),
    ("unknown metric", "metric: frequency", "metric: visits", "metric: visits", "scores.f.metric", "recency_days"),
    ("unknown score in sum", "sum: [r, f, m]", "sum: [r, f, x]", "sum: [r, f, x]",
     "ladders.value.decide.sum.2", "'x'"),
    ("score bands out of order", "{max: 30, score: 4}", "{max: 3, score: 4}", "{max: 3, score: 4}",
     "scores.r.bands.1.max", "lowest bound up"),
    ("grade bands out of order", "{min: 7, grade: B}", "{min: 11, grade: B}", "bands:\n        - {min: 13",
     "ladders.value.decide.bands", "highest 'min' down"),
    ("bad timezone", "timezone: Asia/Shanghai", "timezone: Mars/Olympus", "timezone:", "timezone", "Mars/Olympus"),
    ("unknown currency", "currency: CNY", "currency: XYZ", "currency:", "currency", "'XYZ'"),
    ("extra unknown field", "window_days: 365", "window_days: 365\ncolour: red", "colour:", "colour", "Extra inputs"),
    ("extra field deep inside", "      else: D", "      else: D\n      tie: S", "tie: S", "ladders.value.decide.tie",
     "Extra inputs"),
]


@pytest.mark.parametrize(("what", "old", "new", "marker", "path", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_rule_file_is_refused_with_file_path_and_line(tmp_path: Path, what, old, new, marker, path, words) -> None:
    assert RFM5.count(old) == 1
    text = RFM5.replace(old, new)
    file = tmp_path / "bad.yaml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(RulesetError) as caught:
        load(file)
    err = caught.value
    assert err.source == str(file)
    assert len(err.problems) == 1, err.problems
    problem = err.problems[0]
    assert problem.startswith(f"{path} (line {_line(text, marker)}): "), problem
    assert words in problem
    assert str(file) in str(err)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = RFM5.replace("  f:\n    metric: frequency", "  f:\n    metric: [frequency")
    file = tmp_path / "broken.yaml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(RulesetError) as caught:
        load(file)
    # The flow sequence opened on the metric line is broken by the next line's "bands:".
    assert caught.value.problems[0].startswith(f"line {_line(text, '[frequency') + 1}: not valid YAML")


def test_a_yaml_document_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "list.yaml"
    file.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(RulesetError, match="must be a YAML mapping"):
        load(file)


def test_missing_file_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(RulesetError, match="rfm-5"):
        load(tmp_path / "nope.yaml")


def test_cli_rules_check_ok(capsys, tmp_path: Path) -> None:
    file = tmp_path / "copy.yaml"
    file.write_text(RFM5, encoding="utf-8")
    assert main(["rules", "check", "rfm-5", str(file)]) == 0
    out = capsys.readouterr().out
    assert "ok: rfm-5 (rfm-5@1, ladders: value)" in out
    assert f"ok: {file} (rfm-5@1" in out


def test_cli_rules_check_bad_prints_problems_and_exits_1(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = RFM5.replace("currency: CNY", "currency: XYZ").replace("key: [S, A]", "key: [S, X]")
    bad.write_text(text, encoding="utf-8")
    assert main(["rules", "check", "rfm-5", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "ok: rfm-5" in captured.out
    lines = captured.err.splitlines()
    assert any(
        line.startswith(f"{bad}: currency (line {_line(text, 'currency:')}): ") for line in lines)
    assert any(line.startswith(f"{bad}: ladders.value.key.1 (line {_line(text, 'key: [S, X]')}): ") for line in lines)
    assert len(lines) == 2
