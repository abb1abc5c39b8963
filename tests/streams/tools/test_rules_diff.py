"""``gradeflow rules diff CANDIDATE --against HISTORY``: offline, the computation of ``rules try --against``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.tools.cli import main
from streams.tools.rules_tools import diff_offline, read_history, run, try_ruleset
from tests.rules.shadowhelp import RFM5
from tests.streams.shadowhelp import history, write_history

RS = compile_ruleset(load("rfm-5"))


def candidate_file(tmp_path: Path) -> Path:
    path = tmp_path / "candidate.yaml"
    path.write_text(RFM5.replace('version: "1"', 'version: "2"').replace("- {min: 10, grade: A}", "- {min: 11, grade: A}")
                    .replace("- {max: 7, score: 5}", "- {max: 3, score: 5}"), encoding="utf-8")
    return path


def test_offline_diff_moves_are_rules_try_against_moves(tmp_path):
    events = write_history(tmp_path / "h.jsonl", history())
    cand = compile_ruleset(load(candidate_file(tmp_path)))
    doc = diff_offline(RS, cand, events)
    # What `rules try --against` counted before it shared the function: each customer evaluated at
    # the history's end under both rulesets.
    records = read_history(events)
    old, new = run(RS, records), run(cand, records)
    expected: Counter[tuple[str, str]] = Counter()
    for customer_id in new.states:
        expected[(old.evaluate(customer_id).grades["value"], new.evaluate(customer_id).grades["value"])] += 1
    (lad,) = doc["ladders"]
    assert {(m["from"], m["to"]): m["n"] for m in lad["matrix"]} == dict(expected)
    assert lad["customers"] == len(new.states) == doc["customers"]
    moved = sum(n for (a, b), n in expected.items() if a != b)
    assert moved > 0 and lad["key_downgrades"]["count"] > 0  # the history exercises what is compared
    assert f"ladder value: {sum(expected.values()) - moved} unchanged, {moved} move" in \
        try_ruleset(cand, events, against=RS)
    # every key downgrade of the sample names its metrics and the candidate's reasons
    for s in lad["key_downgrades"]["sample"]:
        assert s["reasons"] and set(s["values"]) == {"recency_days", "frequency", "monetary"}


def test_the_command_prints_the_same_document_as_json(tmp_path, capsys, monkeypatch):
    events = write_history(tmp_path / "h.jsonl", history())
    cand = candidate_file(tmp_path)
    monkeypatch.delenv("GRADEFLOW_RULESET", raising=False)
    assert main(["rules", "diff", str(cand), "--against", str(events), "--json", "--sample", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == diff_offline(RS, compile_ruleset(load(cand)), events, sample=3)
    assert main(["rules", "diff", str(cand), "--against", str(events)]) == 0
    assert "from → to: customers" in capsys.readouterr().out
