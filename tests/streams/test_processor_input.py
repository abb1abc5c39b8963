"""process_batch against bad, late, future and duplicate input, without a broker.

Every record ends as exactly one of applied, duplicate, replayed or dead letter
(``consumed == applied + duplicates + replayed + dead``), checked in every test.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.engine import compile_ruleset
from rules.ruleset import load
from rules.state import CustomerState, forget_seen_before, remember, seen_before
from schemas.events import DeadLetter
from streams.processor import (
    DEAD_LETTER_MAX_BYTES, INTERACTIONS, MAX_EVENT_BYTES, TRANSACTIONS, BatchResult, Record, process_batch,
)

RS = compile_ruleset(load("rfm-5"))
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
BROKER_DEFAULT_MAX = 1_048_588  # Kafka's message.max.bytes default


class Store(dict):
    def save(self, result: BatchResult) -> None:
        for customer_id, (raw, _record) in result.states.items():
            self[customer_id] = raw


def txn_doc(event_id: str, customer: str, when: str, amount: Any = "100.00", kind: str = "purchase",
            **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "customer_id": customer, "occurred_at": when, "type": kind,
            "amount": amount, "currency": "CNY", **extra}


class Feed:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.next = {TRANSACTIONS: 0, INTERACTIONS: 0}

    def raw(self, key: bytes | None, value: bytes | None, role: str = TRANSACTIONS) -> Record:
        record = Record(role, "transactions" if role == TRANSACTIONS else "interactions", 1, self.next[role], key, value)
        self.next[role] += 1
        self.records.append(record)
        return record

    def txn(self, event_id: str, customer: str, when: str, amount: Any = "100.00", kind: str = "purchase",
            **extra: Any) -> Record:
        return self.raw(customer.encode(), orjson.dumps(txn_doc(event_id, customer, when, amount, kind, **extra)))

    def visit(self, event_id: str, customer: str, when: str) -> Record:
        doc = {"event_id": event_id, "customer_id": customer, "occurred_at": when, "type": "visit"}
        return self.raw(customer.encode(), orjson.dumps(doc), INTERACTIONS)


def run(records: list[Record], store: Store | None = None, **options: Any) -> BatchResult:
    store = Store() if store is None else store
    result = process_batch(records, RS, store, NOW, **options)
    assert result.reconciled, result
    assert result.dead == len(result.dead_letters) == sum(result.dead_reasons.values())
    store.save(result)
    return result


def dead_docs(result: BatchResult) -> list[dict[str, Any]]:
    docs = []
    for _key, value in result.dead_letters:
        assert len(value) < BROKER_DEFAULT_MAX
        DeadLetter.model_validate_json(value)
        docs.append(json.loads(value))
    return docs


def changes(result: BatchResult) -> list[tuple]:
    return [(d["customer_id"], d["previous_grade"], d["grade"], d["cause"]["event_id"], d["as_of"])
            for d in (orjson.loads(v) for _, v in result.grade_changes)]


# --- the catalogue of bad input -------------------------------------------------------------

GOOD_AT = "2026-06-01T10:00:00+08:00"
_NAN = (b'{"event_id":"x","customer_id":"zed","occurred_at":"2026-06-01T10:00:00+08:00","type":"purchase",'
        b'"currency":"CNY","amount":NaN}')

# (name, key, value, reason): every entry is a dead letter with that reason.
CATALOGUE: list[tuple[str, bytes | None, bytes | None, str]] = [
    ("nan-string", b"zed", orjson.dumps(txn_doc("x", "zed", GOOD_AT, "NaN")), "invalid_amount"),
    ("nan-literal", b"zed", _NAN, "malformed_json"),
    ("infinity-string", b"zed", orjson.dumps(txn_doc("x", "zed", GOOD_AT, "Infinity")), "invalid_amount"),
    ("infinity-literal", b"zed", _NAN.replace(b"NaN", b"Infinity"), "malformed_json"),
    ("overflow-number", b"zed", _NAN.replace(b"NaN", b"1e999"), "malformed_json"),
    ("40-digit-string", b"zed", orjson.dumps(txn_doc("x", "zed", GOOD_AT, "1" * 40)), "invalid_amount"),
    ("40-digit-number", b"zed", _NAN.replace(b"NaN", b"1" * 40), "invalid_amount"),
    ("too-many-decimals", b"zed", orjson.dumps(txn_doc("x", "zed", GOOD_AT, "12.345")), "invalid_amount"),
    ("currency-not-the-rulesets", b"zed", orjson.dumps({**txn_doc("x", "zed", GOOD_AT), "currency": "USD"}),
     "invalid_currency"),
    ("currency-unknown", b"zed", orjson.dumps({**txn_doc("x", "zed", GOOD_AT), "currency": "XYZ"}),
     "invalid_currency"),
    ("far-future", b"zed", orjson.dumps(txn_doc("x", "zed", "2036-01-01T00:00:00+00:00")), "future_timestamp"),
    ("non-utf8-value", b"zed", b'{"event_id": "\xff\xfe"}', "malformed_json"),
    ("non-utf8-key", b"z\xffed", orjson.dumps(txn_doc("x", "zed", GOOD_AT)), "key_mismatch"),
    ("json-array", b"zed", orjson.dumps([txn_doc("x", "zed", GOOD_AT)]), "invalid_field"),
    ("tombstone", b"zed", None, "tombstone"),
    ("too-large", b"zed", b'{"event_id": "' + b"x" * (10 * 1024 * 1024) + b'"}', "too_large"),
]


@pytest.mark.parametrize(("name", "key", "value", "reason"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_each_bad_record_is_a_dead_letter_with_its_reason(name, key, value, reason) -> None:
    feed = Feed()
    feed.txn("g1", "zed", "2026-06-01T09:00:00+08:00")
    bad = feed.raw(key, value)
    feed.txn("g2", "zed", "2026-06-02T09:00:00+08:00")
    result = run(feed.records)
    assert (result.applied, result.dead, result.dead_reasons) == (2, 1, {reason: 1})
    [doc] = dead_docs(result)
    assert (doc["reason"], doc["source_offset"], doc["source_topic"]) == (reason, bad.offset, "transactions")
    assert doc["error"]
    # The original bytes come back: text where UTF-8, else base64; at most 256 KiB of them.
    if value is None:
        assert doc["value"] is None and doc["value_encoding"] is None
    elif doc["value_encoding"] == "base64":
        assert base64.b64decode(doc["value"]) == value[:DEAD_LETTER_MAX_BYTES]
    else:
        assert doc["value"].encode() == value[:DEAD_LETTER_MAX_BYTES]
    if key == b"z\xffed":
        assert doc["key_encoding"] == "base64" and base64.b64decode(doc["key"]) == key
        assert "not UTF-8" in doc["error"]
    # The good events around it are graded.
    assert [c[3] for c in changes(result)] == ["g1"]


def test_the_whole_catalogue_in_one_batch_between_good_events() -> None:
    feed = Feed()
    for i, (_name, key, value, _reason) in enumerate(CATALOGUE):
        feed.txn(f"g{i}", "amy", f"2026-05-{i + 1:02d}T09:00:00+08:00", "3000.00")
        feed.raw(key, value)
    result = run(feed.records)
    assert result.applied == len(CATALOGUE)
    expected: dict[str, int] = {}
    for _name, _key, _value, reason in CATALOGUE:
        expected[reason] = expected.get(reason, 0) + 1
    assert result.dead_reasons == expected
    assert sorted(d["reason"] for d in dead_docs(result)) == sorted(c[3] for c in CATALOGUE)
    state = CustomerState.from_bytes(result.states["amy"][0])
    assert sum(b[0] for b in state.buckets.values()) == len(CATALOGUE)


def test_unknown_fields_are_accepted_and_ignored() -> None:
    feed = Feed()
    feed.txn("u1", "una", GOOD_AT, loyalty_tier="gold", nested={"deep": [1, {"x": None}]}, schema_version=9)
    plain = Feed()
    plain.txn("u1", "una", GOOD_AT)
    a, b = run(feed.records), run(plain.records)
    assert a.applied == 1 and a.dead == 0
    assert a.states["una"][0] == b.states["una"][0]


def test_a_dead_letter_stays_under_the_brokers_limit_whatever_the_value() -> None:
    # Text that JSON must escape six-fold (control characters) would blow a 256 KiB clip up
    # to 1.5 MB: such a dead letter carries key and value as base64.
    feed = Feed()
    feed.raw(b"\x01" * 300_000, b"\x01" * 250_000)
    feed.raw(b"k", b'"' * (MAX_EVENT_BYTES - 1))
    result = run(feed.records)
    docs = dead_docs(result)
    assert [d["reason"] for d in docs] == ["malformed_json", "malformed_json"]
    assert docs[0]["value_encoding"] == "base64" and base64.b64decode(docs[0]["value"]) == b"\x01" * 250_000
    assert "key truncated" in docs[0]["error"]


# --- future timestamps ----------------------------------------------------------------------

def test_future_timestamps_beyond_the_skew_are_dead_letters() -> None:
    feed = Feed()
    feed.txn("f1", "fay", (NOW + timedelta(hours=23)).isoformat())  # within the default day
    feed.txn("f2", "fay", (NOW + timedelta(hours=25)).isoformat())
    result = run(feed.records)
    assert (result.applied, result.dead_reasons) == (1, {"future_timestamp": 1})
    assert "after the wall clock" in dead_docs(result)[0]["error"]
    # Configurable, and off with None (offline tools over histories).
    assert run(feed.records, max_future_skew_s=3600).dead_reasons == {"future_timestamp": 2}
    assert run(feed.records, max_future_skew_s=None).applied == 2


# --- late events ----------------------------------------------------------------------------

def test_an_event_older_than_the_latest_is_applied_where_it_belongs_and_is_the_cause() -> None:
    feed = Feed()
    feed.txn("a1", "ann", "2026-01-10T10:00:00+08:00", "60000.00")  # R5 F1 M5 = 11 → A
    feed.txn("a2", "ann", "2026-03-01T10:00:00+08:00", "100.00")    # R5 F2 M5 = 12 → A
    feed.txn("a3", "ann", "2026-02-01T10:00:00+08:00", "100.00")    # late, in the window: F3 → 13 → S
    result = run(feed.records)
    assert changes(result) == [("ann", None, "A", "a1", "2026-01-10T10:00:00+08:00"),
                               ("ann", "A", "S", "a3", "2026-03-01T10:00:00+08:00")]  # as of the latest event
    state = CustomerState.from_bytes(result.states["ann"][0])
    assert len(state.buckets) == 3


def test_an_event_older_than_the_allowed_lateness_is_a_late_dead_letter() -> None:
    feed = Feed()
    feed.txn("b1", "ben", "2026-06-01T10:00:00+08:00")
    feed.txn("b2", "ben", "2025-05-31T10:00:00+08:00")  # 366 days before: beyond the 365-day retention
    feed.txn("b3", "ben", "2025-06-02T10:00:00+08:00")  # 364 days: applied
    feed.visit("b4", "ben", "2024-01-01T10:00:00+08:00")  # interactions too
    feed.txn("b5", "cat", "2020-01-01T10:00:00+08:00")  # a customer's first event is never late
    result = run(feed.records)
    assert (result.applied, result.dead_reasons) == (3, {"late": 2})
    docs = dead_docs(result)
    assert [(d["source_offset"], d["source_topic"]) for d in docs] == [(1, "transactions"), (0, "interactions")]
    assert "365 days before the customer's latest event (2026-06-01T10:00:00+08:00)" in docs[0]["error"]
    # The lateness is configurable (GRADEFLOW_ALLOWED_LATENESS_DAYS).
    assert run(feed.records, allowed_lateness_days=30).dead_reasons == {"late": 3}
    assert run(feed.records, allowed_lateness_days=10_000).dead_reasons == {}


def test_a_late_record_replayed_after_a_crash_is_not_dead_lettered_twice() -> None:
    feed = Feed()
    feed.txn("c1", "cy", "2026-06-01T10:00:00+08:00")
    feed.txn("c2", "cy", "2020-01-01T10:00:00+08:00")
    store = Store()
    assert run(feed.records, store).dead_reasons == {"late": 1}
    again = run(feed.records, store)
    assert (again.replayed, again.dead, again.applied) == (2, 0, 0)


# --- duplicates -----------------------------------------------------------------------------

def test_the_same_event_id_twice_counts_once_in_a_batch_across_batches_and_restarts() -> None:
    feed = Feed()
    feed.txn("d1", "dee", "2026-01-10T10:00:00+08:00", "60000.00")  # → A
    feed.txn("d1", "dee", "2026-01-10T10:00:00+08:00", "60000.00")  # producer retry, next offset
    feed.txn("d2", "dee", "2026-01-11T10:00:00+08:00", "100.00")     # F2: still A
    feed.visit("v1", "dee", "2026-01-11T11:00:00+08:00")
    feed.visit("v1", "dee", "2026-01-11T11:00:00+08:00")
    store = Store()
    first = run(feed.records, store)
    assert (first.applied, first.duplicates, first.dead) == (3, 2, 0)
    state = CustomerState.from_bytes(store["dee"])
    assert state.buckets[max(state.buckets)] == [1, 10000] and state.interaction_counts == {"visit": 1}
    # Re-sent much later, at new offsets, to a restarted worker (state read back from bytes).
    later = Feed()
    later.next = dict(feed.next)
    later.txn("d2", "dee", "2026-01-11T10:00:00+08:00", "100.00")
    later.txn("d3", "dee", "2026-01-12T10:00:00+08:00", "100.00")  # F3: 5+3+5 = 13 → S
    second = run(later.records, store)
    assert (second.applied, second.duplicates) == (1, 1)
    assert [c[1:4] for c in changes(second)] == [("A", "S", "d3")]
    # A redelivery of the same offsets is a replay, not a duplicate.
    third = run(later.records, store)
    assert (third.replayed, third.duplicates, third.applied) == (2, 0, 0)


def test_the_memory_of_seen_ids_is_bounded_by_the_lateness() -> None:
    store = Store()
    start = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    feed = Feed()
    for day in range(800):  # four events a day for 800 days, in batches of 100 records
        for n in range(4):
            feed.visit(f"e{day}-{n}", "eve", (start + timedelta(days=day, minutes=n)).isoformat())
    for lo in range(0, len(feed.records), 100):
        run(feed.records[lo:lo + 100], store)
    state = CustomerState.from_bytes(store["eve"])
    days = {day for seen in state.seen.values() for day in (seen if isinstance(seen, list) else [seen])}
    assert 365 <= len(days) <= 367 and len(state.seen) <= 4 * 367 and min(days) >= 19723 + 800 - 367
    # A shorter lateness keeps fewer.
    short = Store()
    for lo in range(0, len(feed.records), 100):
        run(feed.records[lo:lo + 100], short, allowed_lateness_days=7)
    assert len(set(CustomerState.from_bytes(short["eve"]).seen.values())) <= 9
    # Many ids on one day are all remembered, each once.
    busy = Feed()
    for n in range(40):
        busy.visit(f"b{n}", "bo", "2026-06-01T10:00:00+08:00")
        busy.visit(f"b{n}", "bo", "2026-06-01T10:00:00+08:00")
    result = run(busy.records)
    assert (result.applied, result.duplicates) == (40, 40)
    assert CustomerState.from_bytes(result.states["bo"][0]).seen == {f"b{n}": 20605 for n in range(40)}


def test_an_id_on_two_days_is_two_events_and_each_is_forgotten_on_its_own() -> None:
    state = CustomerState()
    for day in (20000, 20003, 20000):
        remember(state, day, "x")
    remember(state, 20001, "y")
    assert state.seen == {"x": [20000, 20003], "y": 20001}
    assert seen_before(state, 20000, "x") and seen_before(state, 20003, "x") and not seen_before(state, 20001, "x")
    again = CustomerState.from_bytes(state.to_bytes())
    assert again.seen == state.seen
    forget_seen_before(again, 20001)
    assert again.seen == {"x": 20003, "y": 20001}
    forget_seen_before(again, 20004)
    assert again.seen == {}


def test_state_bytes_of_format_1_and_2_still_load() -> None:
    v1 = orjson.dumps([1, 1.7e9, 1.7e9, 1.7e9, [[739000, 1, 500]], None, {}, {"value": "B"}, {"t": 4}])
    v2 = orjson.dumps([2, 1.7e9, 1.7e9, 1.7e9, [[739000, 1, 500], [739001, 2, 900, 900, 600]], None, {},
                       {"value": "B"}, {"t": 4},
                       {"se": [[20000, ["a", "b"]], [20001, ["d", "c", "a"]]], "gs": {"value": 1.6e9}, "rs": "x@1"}])
    for raw in (v1, v2):
        state = CustomerState.from_bytes(raw)
        assert state.grades == {"value": "B"} and state.offsets == {"t": 4} and state.buckets[739000] == [1, 500]
    assert CustomerState.from_bytes(v1).seen == {}
    state = CustomerState.from_bytes(v2)
    assert state.seen == {"a": [20000, 20001], "b": 20000, "d": 20001, "c": 20001}
    assert state.buckets == {739000: [1, 500], 739001: [2, 900, 900, 600]}
    assert state.grade_since == {"value": 1.6e9} and state.ruleset == "x@1"
    assert seen_before(state, 20001, "a") and not seen_before(state, 20002, "a")
    raw = state.to_bytes()
    assert orjson.loads(raw)[0] == 3 and CustomerState.graded_by(raw, "x@1")
    again = CustomerState.from_bytes(raw)
    assert (again.seen, again.buckets, again.grade_since, again.ruleset) == \
        (state.seen, state.buckets, state.grade_since, state.ruleset)


def test_state_format_3_is_a_flat_list_of_buckets_and_an_object_of_ids() -> None:
    state = CustomerState(1.7e9, 1.7e9, 1.6e9, {739000: [1, 500], 739002: [2, -100]}, grades={"value": "A"},
                          offsets={"t": 9})
    remember(state, 20000, "e1")
    doc = orjson.loads(state.to_bytes())
    assert doc[4] == [739000, 1, 500, 739002, 2, -100]
    assert doc[9] == {"sd": {"e1": 20000}}
    with pytest.raises(ValueError, match="unknown customer state format 4"):
        CustomerState.from_bytes(orjson.dumps([4, *doc[1:]]))


# --- the four outcomes do not depend on batching ----------------------------------------------

BASE = datetime(2025, 1, 1, tzinfo=timezone.utc)


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 5), st.sampled_from(["purchase", "refund", "visit"])),
                    min_size=1, max_size=30),
    size=st.integers(1, 30),
    lateness=st.sampled_from([None, 20, 200]),
)
def test_outcomes_do_not_depend_on_batching(events, size, lateness) -> None:
    """Days jump around (late events, some beyond the lateness); ids repeat (duplicates)."""
    feed = Feed()
    for day, ident, kind in events:
        when = (BASE + timedelta(days=day, hours=ident)).isoformat()
        event_id = f"{kind}-{day}-{ident}"  # the same event when day, ident and kind repeat
        if kind == "visit":
            feed.visit(event_id, "hal", when)
        else:
            feed.txn(event_id, "hal", when, "150.00", kind)

    def outcome(batch: int) -> tuple:
        store = Store()
        totals = [0, 0, 0, 0]
        dead: list[tuple] = []
        emitted: list[tuple] = []
        for lo in range(0, len(feed.records), batch):
            r = run(feed.records[lo:lo + batch], store, allowed_lateness_days=lateness)
            totals = [totals[0] + r.applied, totals[1] + r.duplicates, totals[2] + r.replayed, totals[3] + r.dead]
            dead += [(d["source_topic"], d["source_offset"], d["reason"]) for d in dead_docs(r)]
            emitted += changes(r)
        return totals, sorted(dead), emitted, dict(store)

    whole = outcome(len(feed.records))
    assert outcome(size) == whole
    assert sum(whole[0]) == len(feed.records) and whole[0][2] == 0
