"""The customer state's changelog format: every part survives bytes and back."""

from __future__ import annotations

import orjson

from rules.state import CustomerState


def _full() -> CustomerState:
    return CustomerState(
        last_event_ts=1795275223.2, last_purchase_ts=1795275000.0, first_purchase_ts=1770502118.4,
        buckets={739655: [1, 78685], 739701: [2, 250523, 260000, 200000]}, last_interaction_ts=1795000000.5,
        interaction_counts={"call": 3, "visit": 1}, grades={"value": "A", "tier": "VIP"}, offsets={"t": 41, "i": 7},
        last_by_type={"call": 1795000000.5}, ibuckets={739700: {"call": 2}}, attrs={"stage": [1795000000.5, "won"]},
        flows={739650: 10000, 739651: -2500}, balance_base=123456, invoices={"inv-1": [739600, None]},
        grade_since={"value": 1790000000.0}, ruleset="rfm-5@1", seen={20500: ["e1", "e2"]},
        warned={"value": 1796000000.0})


def test_every_part_of_the_state_round_trips_through_the_changelog_format() -> None:
    state = _full()
    assert CustomerState.from_bytes(state.to_bytes()) == state


def test_an_empty_state_stays_small_and_round_trips() -> None:
    raw = CustomerState().to_bytes()
    assert len(raw) < 40
    assert CustomerState.from_bytes(raw) == CustomerState()


def test_optional_parts_a_newer_writer_added_are_ignored_not_refused() -> None:
    doc = orjson.loads(_full().to_bytes())
    doc[9]["zz"] = {"something": "new"}
    assert CustomerState.from_bytes(orjson.dumps(doc)) == _full()
