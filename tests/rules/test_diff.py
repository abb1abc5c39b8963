"""rules/diff.py: the blast radius of promoting a candidate, from pairs of grades (pure)."""

from __future__ import annotations

from rules.diff import Pair, blast_radius, moves, render, without_detail
from tests.rules.shadowhelp import candidate

CAND = candidate()  # ladder value: S A B C D, key S A
ACTIVE = {"id": "rfm-5", "version": "1"}


def pairs() -> list[Pair]:
    return [
        Pair("a", {"value": "S"}, {"value": "S"}),
        Pair("b", {"value": "S"}, {"value": "B"}, {"value": ({"monetary": "10.00"}, ["why b"])}),  # left key: critical
        Pair("c", {"value": "S"}, {"value": "A"}, {"value": ({"monetary": "20.00"}, ["why c"])}),  # within key: warning
        Pair("d", {"value": "B"}, {"value": "C"}),  # not key: no alert
        Pair("e", {"value": "C"}, {"value": "A"}),  # upgrade
        Pair("f", {}, {"value": "D"}),  # no active grade on that ladder
        Pair("g", {"value": "A"}, {"value": "A"}),
    ]


def test_matrix_with_the_diagonal_key_downgrades_alerts_and_distribution():
    doc = blast_radius(ACTIVE, CAND, pairs())
    assert doc["active"] == ACTIVE and doc["candidate"] == {"id": "rfm-5", "version": "2"}
    assert doc["customers"] == 7 and doc["differing"] == 5
    assert doc["alerts"] == {"critical": 1, "warning": 1}
    (lad,) = doc["ladders"]
    assert lad["name"] == "value" and lad["customers"] == 7 and lad["unchanged"] == 2
    assert lad["matrix"] == [{"from": "-", "to": "D", "n": 1}, {"from": "A", "to": "A", "n": 1},
                             {"from": "B", "to": "C", "n": 1}, {"from": "C", "to": "A", "n": 1},
                             {"from": "S", "to": "A", "n": 1}, {"from": "S", "to": "B", "n": 1},
                             {"from": "S", "to": "S", "n": 1}]
    assert lad["key_downgrades"] == {"count": 2, "sample": [
        {"customer_id": "b", "from": "S", "to": "B", "values": {"monetary": "10.00"}, "reasons": ["why b"]},
        {"customer_id": "c", "from": "S", "to": "A", "values": {"monetary": "20.00"}, "reasons": ["why c"]}]}
    assert lad["alerts"] == {"critical": 1, "warning": 1}
    assert lad["distribution"] == [
        {"grade": "S", "now": 3, "after": 1}, {"grade": "A", "now": 1, "after": 3},
        {"grade": "B", "now": 1, "after": 1}, {"grade": "C", "now": 1, "after": 1},
        {"grade": "D", "now": 0, "after": 1}, {"grade": "-", "now": 1, "after": 0}]
    text = render(doc)
    assert "S → B: 1" in text and "A → A: 1 (unchanged)" in text and "downgraded: b S → B" in text


def test_the_sample_is_bounded_and_the_answer_does_not_depend_on_order():
    many = [Pair(f"k{i:02d}", {"value": "S"}, {"value": "D"}) for i in range(30)]
    doc = blast_radius(ACTIVE, CAND, list(reversed(many)), sample=3)
    (lad,) = doc["ladders"]
    assert lad["key_downgrades"]["count"] == 30
    assert [s["customer_id"] for s in lad["key_downgrades"]["sample"]] == ["k00", "k01", "k02"]
    assert doc == blast_radius(ACTIVE, CAND, many, sample=3)
    assert moves(many, "value") == {("S", "D"): 30}


def test_without_detail_keeps_everything_but_the_samples_metrics_and_reasons():
    doc = blast_radius(ACTIVE, CAND, pairs())
    bare = without_detail(doc)
    assert bare["ladders"][0]["key_downgrades"]["sample"] == [
        {"customer_id": "b", "from": "S", "to": "B"}, {"customer_id": "c", "from": "S", "to": "A"}]
    assert {k: v for k, v in bare.items() if k != "ladders"} == {k: v for k, v in doc.items() if k != "ladders"}
