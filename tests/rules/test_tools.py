"""`gradeflow rules check / explain / try` on histories, offline, with the worker's code."""

from __future__ import annotations

from pathlib import Path

import orjson

from streams.tools.cli import main

from tests.rules.presethelp import contact, local, txn

RFM5 = Path(__file__).parents[2] / "rules" / "presets" / "rfm-5.yaml"


def history(tmp_path: Path, events: list, junk: bool = True) -> Path:
    path = tmp_path / "history.jsonl"
    lines = [orjson.dumps(e).decode() for e in events]
    if junk:
        lines.insert(1, "{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


EVENTS = [
    txn(local("2026-01-05"), "purchase", "12000", customer="c1"),
    txn(local("2026-02-05"), "purchase", "30000", customer="c1"),
    txn(local("2026-02-06"), "purchase", "100", customer="c2"),
    contact(local("2026-02-07"), "visit", customer="c2"),
    txn(local("2026-03-01"), "purchase", "7000", customer="c3"),
]


def test_check_every_preset_passes(capsys) -> None:
    presets = sorted(p.stem for p in RFM5.parent.glob("*.yaml"))
    assert main(["rules", "check", *presets]) == 0
    assert capsys.readouterr().out.count("ok: ") == len(presets)


def test_check_names_an_unknown_metric_window_and_grade(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""id: bad
version: "1"
attributes: {stage: text}
ladders:
  value:
    grades: [A, B]
    decide:
      rules:
        - {grade: A, when: {metric: purchases.net.quarter, ge: 1}}
        - {grade: Z, when: {metric: attribute.colour, eq: red}}
        - {grade: B, when: {metric: visits, ge: 1}}
      else: B
""", encoding="utf-8")
    assert main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: ladders.value.decide.rules.1.grade (line 10): " in err and "'Z'" in err
    capsys.readouterr()
    # Grades are checked first (per ladder); fix the grade to see the metrics.
    bad.write_text(bad.read_text(encoding="utf-8").replace("grade: Z", "grade: A"), encoding="utf-8")
    assert main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "ladders.value.decide.rules.0.when.metric (line 9): unknown window 'quarter'; known: <N>d" in err
    assert "ladders.value.decide.rules.1.when.metric (line 10): unknown attribute 'colour'" in err and "stage" in err
    assert "ladders.value.decide.rules.2.when.metric (line 11): unknown metric 'visits'; known: recency_days" in err


def test_explain_prints_metrics_reasons_and_history(tmp_path: Path, capsys) -> None:
    path = history(tmp_path, EVENTS)
    assert main(["rules", "explain", "rfm-5", "--events", str(path), "--customer", "c1"]) == 0
    out = capsys.readouterr().out
    assert "as of 2026-03-01T12:00:00+08:00 (end of the history)" in out
    assert "monetary = 42000.00 CNY" in out and "recency_days = 24 days" in out
    assert "ladder value: grade A" in out
    assert "  - R+F+M = 10 (≥ 10): grade A." in out
    assert "value: - → B (initial, transaction" in out and "value: B → A (upgrade, transaction" in out


def test_explain_unknown_customer_exits_1(tmp_path: Path, capsys) -> None:
    path = history(tmp_path, EVENTS)
    assert main(["rules", "explain", "rfm-5", "--events", str(path), "--customer", "nobody"]) == 1
    assert "customers: c1, c2, c3" in capsys.readouterr().err


def test_explain_relative_grade_shows_the_population(tmp_path: Path, capsys) -> None:
    events = [txn(local("2026-02-01"), "purchase", str(100 * (i + 1)), customer=f"k{i:02d}") for i in range(40)]
    path = history(tmp_path, events, junk=False)
    assert main(["rules", "explain", "key-account-abc", "--events", str(path), "--customer", "k39"]) == 0
    out = capsys.readouterr().out
    assert "population: purchases.net.365d at quantile 0.95 = " in out
    assert "ladder value: grade A" in out


def test_try_prints_distribution_and_moves(tmp_path: Path, capsys) -> None:
    path = history(tmp_path, EVENTS)
    assert main(["rules", "try", "rfm-5", "--events", str(path)]) == 0
    out = capsys.readouterr().out
    assert "6 events, 5 applied, 1 dead letters, 3 customers" in out
    assert "dead letters: malformed_json 1" in out
    lines = out.splitlines()
    start = lines.index("ladder value:")
    assert [line.split()[:2] for line in lines[start + 1:start + 6]] == [
        ["S", "0"], ["A", "1"], ["B", "1"], ["C", "1"], ["D", "0"]]
    # A stricter copy of rfm-5: A needs 11 points; c1 (10 points) moves A → B.
    strict = tmp_path / "strict.yaml"
    strict.write_text(RFM5.read_text(encoding="utf-8").replace('version: "1"', 'version: "2"')
                      .replace("{min: 10, grade: A}", "{min: 11, grade: A}"), encoding="utf-8")
    assert main(["rules", "try", str(strict), "--events", str(path), "--against", "rfm-5"]) == 0
    out = capsys.readouterr().out
    assert "against rfm-5@1: customers moving from its grade to this ruleset's" in out
    assert "ladder value: 2 unchanged, 1 move" in out
    assert "  A → B: 1" in out


def test_try_against_a_ruleset_with_other_ladders(tmp_path: Path, capsys) -> None:
    path = history(tmp_path, EVENTS)
    assert main(["rules", "try", "lifecycle", "--events", str(path), "--against", "rfm-5"]) == 0
    out = capsys.readouterr().out
    assert "ladder lifecycle: not in rfm-5@1" in out and "ladder value: only in rfm-5@1" in out
    assert "actual             3  100.0%" in out


def test_try_report_is_one_offline_html_file_with_the_distribution_and_flows(tmp_path: Path, capsys) -> None:
    import re
    import xml.etree.ElementTree as ET

    path = history(tmp_path, EVENTS)
    strict = tmp_path / "strict.yaml"
    strict.write_text(RFM5.read_text(encoding="utf-8").replace('version: "1"', 'version: "2"')
                      .replace("{min: 10, grade: A}", "{min: 11, grade: A}"), encoding="utf-8")
    report = tmp_path / "report.html"
    assert main(["rules", "try", str(strict), "--events", str(path), "--against", "rfm-5",
                 "--report", str(report)]) == 0
    assert f"report: {report}" in capsys.readouterr().out
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"?https?:", text) and "<script" not in text  # nothing fetched
    # The bar chart: one bar per grade, its height the count (S 0, A 0, B 2, C 1, D 0 under the strict copy).
    svg = ET.fromstring(re.search(r"<svg.*?</svg>", text, re.S).group(0))  # type: ignore[union-attr]
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert titles == ["S: 0", "A: 0", "B: 2", "C: 1", "D: 0"]
    # The flows: rows rfm-5's grades, columns the strict copy's; c1 moves A → B.
    table = re.search(r'<table class="flows">.*?</table>', text, re.S).group(0)  # type: ignore[union-attr]
    rows = {r[0]: [int(n) for n in r[1:]] for r in
            (re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:])}
    assert rows["A"] == [0, 0, 1, 0, 0] and rows["B"] == [0, 0, 1, 0, 0] and rows["C"] == [0, 0, 0, 1, 0]
    assert "2 unchanged, 1 move" in text
