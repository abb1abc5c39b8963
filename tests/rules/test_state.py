"""The customer state's changelog format: every part survives bytes and back."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.mallochelp import malloc_in_use
from rules.state import CustomerState


def _full() -> CustomerState:
    return CustomerState(
        last_event_ts=1795275223.2, last_purchase_ts=1795275000.0, first_purchase_ts=1770502118.4,
        buckets={739655: [1, 78685], 739701: [2, 250523, 260000, 200000]}, last_interaction_ts=1795000000.5,
        interaction_counts={"call": 3, "visit": 1}, grades={"value": "A", "tier": "VIP"}, offsets={"t": 41, "i": 7},
        last_by_type={"call": 1795000000.5}, ibuckets={739700: {"call": 2}}, attrs={"stage": [1795000000.5, "won"]},
        flows={739650: 10000, 739651: -2500}, balance_base=123456, invoices={"inv-1": [739600, None]},
        grade_since={"value": 1790000000.0}, ruleset="rfm-5@1", seen={"e1": 20500, "e2": 20500, "e3": [20499, 20500]},
        warned={"value": 1796000000.0})


def test_every_part_of_the_state_round_trips_through_the_changelog_format() -> None:
    state = _full()
    assert CustomerState.from_bytes(state.to_bytes()) == state


_days = st.integers(700000, 800000)
_ids = st.text(max_size=12)


@settings(max_examples=200, deadline=None)
@given(buckets=st.dictionaries(_days, st.lists(st.integers(-2**62, 2**62), min_size=2, max_size=2)
                               | st.lists(st.integers(-2**62, 2**62), min_size=4, max_size=4), max_size=20),
       seen=st.dictionaries(_ids, st.integers(0, 99999) | st.lists(st.integers(0, 99999), min_size=2, max_size=3),
                            max_size=20))
def test_buckets_of_any_width_and_seen_ids_round_trip(buckets, seen) -> None:
    state = CustomerState(buckets=buckets, seen=seen, ruleset="rfm-5@1")
    again = CustomerState.from_bytes(state.to_bytes())
    assert again.buckets == buckets and again.seen == seen and again == state


def test_a_state_holds_an_allocation_of_its_size_not_orjsons_4_kib() -> None:
    # A table holds one state per customer for as long as the customer is; an orjson output of
    # any length holds 4 KiB, 10 times what a typical state needs.
    state = _full()
    assert len(state.to_bytes()) < 1024
    before = malloc_in_use()
    held = [state.to_bytes() for _ in range(2000)]
    per_state = (malloc_in_use() - before) / len(held)
    assert per_state < 1024, per_state


def test_an_empty_state_stays_small_and_round_trips() -> None:
    raw = CustomerState().to_bytes()
    assert len(raw) < 40
    assert CustomerState.from_bytes(raw) == CustomerState()


def test_optional_parts_a_newer_writer_added_are_ignored_not_refused() -> None:
    doc = orjson.loads(_full().to_bytes())
    doc[9]["zz"] = {"something": "new"}
    assert CustomerState.from_bytes(orjson.dumps(doc)) == _full()


_text = st.text(max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_rulesets = st.sampled_from(["rfm-5@1", "rfm-5@2", 'odd "quoted"}]@1', "rs"])


@settings(max_examples=300, deadline=None)
@given(ruleset=st.none() | _rulesets, asked=_rulesets, attrs=st.dictionaries(_text, _json, max_size=3),
       seen=st.dictionaries(_text, st.integers(0, 99999) | st.lists(st.integers(0, 99999), min_size=2, max_size=3),
                            max_size=2),
       warned=st.dictionaries(st.sampled_from(["value", "rs"]), st.floats(0, 2e9), max_size=2))
def test_graded_by_reads_the_ruleset_without_decoding_whatever_else_the_state_holds(ruleset, asked, attrs, seen,
                                                                                   warned) -> None:
    # Attributes are customers' own JSON: they may hold {"rs": "<a ruleset>"} and must not fool it.
    attrs = {**attrs, "rs": asked} if len(attrs) % 2 else attrs
    state = CustomerState(attrs={"crm": attrs}, seen=seen, warned=warned, ruleset=ruleset)
    raw = state.to_bytes()
    assert CustomerState.graded_by(raw, asked) == (CustomerState.from_bytes(raw).ruleset == asked)


def test_graded_by_is_false_for_a_state_written_with_the_ruleset_elsewhere() -> None:
    # Before "rs" moved last: such a state is decoded by the caller, not misread.
    doc = orjson.loads(_full().to_bytes())
    doc[9] = {"rs": "rfm-5@1", **{k: v for k, v in doc[9].items() if k != "rs"}}
    raw = orjson.dumps(doc)
    assert CustomerState.from_bytes(raw).ruleset == "rfm-5@1" and not CustomerState.graded_by(raw, "rfm-5@1")
    assert CustomerState.graded_by(_full().to_bytes(), "rfm-5@1")
