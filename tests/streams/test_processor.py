"""The hot path without Kafka (streams/processor.py): process_batch over a dict-backed store."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.mallochelp import malloc_in_use
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load
from rules.state import CustomerState
from schemas.events import Alert, DeadLetter, GradeChange
from streams.processor import INTERACTIONS, TRANSACTIONS, BatchResult, Record, process_batch

RS = compile_ruleset(load("rfm-5"))
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)  # wall clock: after every event (future-timestamp check)


class DictStore(dict):
    """A StateReader over a dict; ``save`` writes a batch's states back as the agent would."""

    def save(self, result: BatchResult) -> None:
        for customer_id, (raw, _record) in result.states.items():
            self[customer_id] = raw


class Feed:
    """Records of the two input topics with increasing offsets per topic."""

    def __init__(self) -> None:
        self.next = {TRANSACTIONS: 0, INTERACTIONS: 0}
        self.records: list[Record] = []

    def add(self, role: str, key: bytes | None, value: bytes | None) -> Record:
        topic = "transactions" if role == TRANSACTIONS else "interactions"
        record = Record(role, topic, 3, self.next[role], key, value, timestamp_ms=1_700_000_000_000 + len(self.records))
        self.next[role] += 1
        self.records.append(record)
        return record

    def txn(self, customer: str, when: str, amount: str, kind: str = "purchase", event_id: str | None = None) -> Record:
        doc = {"event_id": event_id or f"t{len(self.records)}", "customer_id": customer, "occurred_at": when,
               "type": kind, "amount": amount, "currency": "CNY"}
        return self.add(TRANSACTIONS, customer.encode(), orjson.dumps(doc))

    def contact(self, customer: str, when: str, kind: str = "visit") -> Record:
        doc = {"event_id": f"i{len(self.records)}", "customer_id": customer, "occurred_at": when, "type": kind}
        return self.add(INTERACTIONS, customer.encode(), orjson.dumps(doc))


def changes_of(result: BatchResult) -> list[dict[str, Any]]:
    out = []
    for key, value in result.grade_changes:
        doc = json.loads(value)
        GradeChange.model_validate(doc)
        assert key == doc["customer_id"].encode()
        out.append(doc)
    return out


def by_customer(changes: list[dict[str, Any]]) -> dict[str, list[tuple]]:
    seq: dict[str, list[tuple]] = {}
    for c in changes:
        seq.setdefault(c["customer_id"], []).append((c["previous_grade"], c["grade"], c["direction"], c["cause"]["event_id"]))
    return seq


def scripted() -> tuple[Feed, dict[str, Record]]:
    """Three customers, interleaved, with three bad records in the middle."""
    f = Feed()
    marks: dict[str, Record] = {}
    f.txn("alice", "2025-01-10T10:00:00+08:00", "60000.00", event_id="a1")   # R5 F1 M5 = 11 → A
    f.txn("bob", "2025-01-10T11:00:00+08:00", "500.00", event_id="b1")       # R5 F1 M1 = 7  → B
    f.txn("carol", "2025-01-10T12:00:00+08:00", "5000.00", event_id="c1")    # R5 F1 M3 = 9  → B
    f.txn("alice", "2025-01-11T10:00:00+08:00", "100.00", event_id="a2")     # R5 F2 M5 = 12 → A (no event)
    marks["malformed"] = f.add(TRANSACTIONS, b"carol", b'{"event_id": "x", "customer_id": "carol", ')
    marks["binary"] = f.add(TRANSACTIONS, b"bob", b"\xff\xfe\x00garbage")
    marks["mismatch"] = f.add(TRANSACTIONS, b"alice", orjson.dumps({
        "event_id": "m1", "customer_id": "bob", "occurred_at": "2025-01-12T10:00:00+08:00", "type": "purchase",
        "amount": "99999.00", "currency": "CNY"}))
    f.txn("alice", "2025-01-12T10:00:00+08:00", "100.00", event_id="a3")     # R5 F3 M5 = 13 → S (upgrade)
    f.txn("carol", "2025-01-20T12:00:00+08:00", "50000.00", event_id="c2")   # R5 F2 M5 = 12 → A (upgrade)
    f.txn("alice", "2025-01-13T10:00:00+08:00", "20000.00", "refund", "a4")  # net 40300: M4, 5+3+4 = 12 → A (alert)
    f.contact("bob", "2025-06-10T10:00:00+08:00")                            # 151 days: R1 F1 M1 = 3 → D
    f.contact("carol", "2025-01-21T09:00:00+08:00")                          # R5 (1 day), still 12 → A
    return f, marks


EXPECTED = {
    "alice": [(None, "A", "initial", "a1"), ("A", "S", "upgrade", "a3"), ("S", "A", "downgrade", "a4")],
    "bob": [(None, "B", "initial", "b1"), ("B", "D", "downgrade", "i10")],
    "carol": [(None, "B", "initial", "c1"), ("B", "A", "upgrade", "c2")],
}


def test_scripted_history_gives_the_expected_grades_and_dead_letters() -> None:
    feed, marks = scripted()
    store = DictStore()
    result = process_batch(feed.records, RS, store, NOW)
    assert by_customer(changes_of(result)) == EXPECTED
    # One alert: alice S → A (within the key grades: warning). bob's B → D leaves no key grade.
    [(key, raw)] = result.alerts
    alert = Alert.model_validate_json(raw).model_dump(mode="json")
    assert key == b"alice" and (alert["previous_grade"], alert["grade"], alert["severity"]) == ("S", "A", "warning")
    # The last change of bob carries metrics reasoned from the rules.
    bob_last = [c for c in changes_of(result) if c["customer_id"] == "bob"][-1]
    assert bob_last["metrics"] == {"recency_days": 151, "frequency": 1, "monetary": "500.00", "r": 1, "f": 1, "m": 1,
                                   "code": "111",
                                   "values": {"frequency": 1, "monetary": "500.00", "recency_days": 151}}
    assert bob_last["as_of"] == "2025-06-10T10:00:00+08:00"

    assert (result.consumed, result.applied, result.replayed, result.dead) == (12, 9, 0, 3)
    dead = {json.loads(v)["source_offset"]: (k, DeadLetter.model_validate_json(v), json.loads(v)) for k, v in result.dead_letters}
    assert sorted(dead) == sorted(marks[m].offset for m in marks)
    _, model, doc = dead[marks["malformed"].offset]
    assert (doc["reason"], doc["source_topic"], doc["source_partition"]) == ("malformed_json", "transactions", 3)
    assert (doc["value"], doc["value_encoding"]) == ('{"event_id": "x", "customer_id": "carol", ', "utf-8")
    assert (doc["key"], doc["key_encoding"]) == ("carol", "utf-8")
    assert doc["source_timestamp_ms"] == marks["malformed"].timestamp_ms
    assert model.dead_lettered_at == NOW
    _, _, doc = dead[marks["binary"].offset]
    assert doc["reason"] == "malformed_json" and doc["value_encoding"] == "base64"
    assert base64.b64decode(doc["value"]) == b"\xff\xfe\x00garbage"
    dead_key, _, doc = dead[marks["mismatch"].offset]
    assert doc["reason"] == "key_mismatch" and dead_key == b"alice"
    # The mismatched event was not applied to bob (or anyone).
    store.save(result)
    bob = CustomerState.from_bytes(store["bob"])
    assert sum(n for _, n in bob.buckets.values()) == 500_00
    # Each touched customer's state comes with its last applied record.
    assert {c: r.offset for c, (_, r) in result.states.items()} == {"alice": 9, "bob": 0, "carol": 1}
    assert result.states["bob"][1].role == INTERACTIONS


def test_currency_other_than_the_rulesets_is_a_dead_letter() -> None:
    feed = Feed()
    feed.add(TRANSACTIONS, b"dan", orjson.dumps({"event_id": "u1", "customer_id": "dan",
             "occurred_at": "2025-01-10T10:00:00+08:00", "type": "purchase", "amount": "5", "currency": "USD"}))
    result = process_batch(feed.records, RS, DictStore(), NOW)
    assert result.dead == 1 and result.grade_changes == [] and result.states == {}
    assert json.loads(result.dead_letters[0][1])["reason"] == "invalid_currency"


def test_tombstone_and_null_key_are_dead_letters() -> None:
    feed = Feed()
    feed.add(TRANSACTIONS, b"erin", None)
    feed.add(INTERACTIONS, None, orjson.dumps({"event_id": "i", "customer_id": "erin",
             "occurred_at": "2025-01-10T10:00:00+08:00", "type": "visit"}))
    result = process_batch(feed.records, RS, DictStore(), NOW)
    docs = [json.loads(v) for _, v in result.dead_letters]
    assert [(d["reason"], d["source_topic"], d["value"], d["key"]) for d in docs] == [
        ("tombstone", "transactions", None, "erin"), ("key_mismatch", "interactions", docs[1]["value"], None)]


def test_replayed_records_are_skipped_and_counted() -> None:
    feed, _ = scripted()
    store = DictStore()
    first = process_batch(feed.records[:8], RS, store, NOW)
    store.save(first)
    # A crash before the commit: the broker redelivers from offset 4; two new records follow.
    feed.txn("carol", "2025-02-01T10:00:00+08:00", "1.00", event_id="c3")
    replay = [r for r in feed.records if r.offset >= 4 or r.role == INTERACTIONS]
    second = process_batch(replay, RS, store, NOW)
    store.save(second)
    assert second.consumed == second.applied + second.replayed + second.dead
    # Offsets 4-6 are the bad ones (dead again), 7 was applied before (replayed); 8-10 and the
    # interactions are new.
    assert (second.dead, second.replayed) == (3, 1)
    assert second.applied == second.consumed - 4
    both = by_customer(changes_of(first) + changes_of(second))
    # No change emitted twice, none lost; c3 (1.00 on Feb 1) is carol's third purchase:
    # R5 F3 M5 (55001.00) = 13 → S.
    assert both == {**EXPECTED, "carol": EXPECTED["carol"] + [("A", "S", "upgrade", "c3")]}
    # Replaying everything once more applies nothing.
    third = process_batch(feed.records, RS, store, NOW)
    assert (third.applied, third.replayed, third.dead, third.grade_changes) == (0, third.consumed - 3, 3, [])


def _run_in_batches(records: list[Record], size: int) -> tuple[list[dict], list[dict], list[dict], DictStore]:
    store = DictStore()
    changes, alerts, dead = [], [], []
    for start in range(0, len(records), size):
        result = process_batch(records[start:start + size], RS, store, NOW + timedelta(seconds=start))
        store.save(result)
        changes += changes_of(result)
        alerts += [json.loads(v) for _, v in result.alerts]
        dead += [json.loads(v) for _, v in result.dead_letters]
    return changes, alerts, dead, store


def _strip(docs: list[dict], *names: str) -> list[dict]:
    return [{k: v for k, v in d.items() if k not in names} for d in docs]


@pytest.mark.parametrize("size", [1, 2, 7])
def test_batching_does_not_change_what_is_emitted(size) -> None:
    feed, _ = scripted()
    whole = _run_in_batches(feed.records, len(feed.records))
    split = _run_in_batches(feed.records, size)

    def per_customer(docs: list[dict]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for d in docs:
            out.setdefault(d["customer_id"], []).append(d)
        return out

    # Kafka orders by key: what matters is each customer's sequence, and nothing else differs.
    assert per_customer(_strip(split[0], "emitted_at")) == per_customer(_strip(whole[0], "emitted_at"))
    assert per_customer(split[1]) == per_customer(whole[1])
    assert sorted(d["source_offset"] for d in split[2]) == sorted(d["source_offset"] for d in whole[2])
    assert _strip(split[2], "dead_lettered_at") == _strip(whole[2], "dead_lettered_at")
    assert dict(split[3]) == dict(whole[3])
    assert len(whole[0]) == sum(len(v) for v in EXPECTED.values())


BASE = datetime(2025, 3, 1, tzinfo=timezone.utc)


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=300 * 24 * 60),  # minutes after BASE: all within one window
            st.sampled_from(["purchase", "purchase", "refund", "visit"]),
            st.integers(min_value=1, max_value=3_000_000),      # fen
        ),
        min_size=1, max_size=25,
    ),
    seed=st.randoms(use_true_random=False),
    size=st.integers(min_value=1, max_value=25),
)
def test_final_grade_does_not_depend_on_event_order(events, seed, size) -> None:
    def records(order: list[tuple[int, str, int]]) -> list[Record]:
        feed = Feed()  # offsets are assigned in arrival order, after the shuffle
        for i, (minutes, kind, fen) in enumerate(order):
            when = (BASE + timedelta(minutes=minutes)).isoformat()
            if kind == "visit":
                feed.contact("zoe", when)
            else:
                feed.txn("zoe", when, f"{fen // 100}.{fen % 100:02d}", kind, event_id=f"e{minutes}-{kind}-{fen}-{i}")
        return feed.records

    shuffled = events[:]
    seed.shuffle(shuffled)
    ordered = sorted(events)
    a = _run_in_batches(records(ordered), len(events))[3]
    b = _run_in_batches(records(shuffled), size)[3]
    sa, sb = CustomerState.from_bytes(a["zoe"]), CustomerState.from_bytes(b["zoe"])
    assert sa.grades == sb.grades
    assert sa.buckets == sb.buckets
    assert (sa.last_purchase_ts, sa.last_event_ts, sa.interaction_counts) == (sb.last_purchase_ts, sb.last_event_ts,
                                                                           sb.interaction_counts)
    latest = BASE + timedelta(minutes=max(m for m, _, _ in events))
    ea, eb = evaluate(RS, sa, latest), evaluate(RS, sb, latest)
    assert (ea.grades, ea.scores, ea.recency_days, ea.frequency, ea.monetary_minor) == (
        eb.grades, eb.scores, eb.recency_days, eb.frequency, eb.monetary_minor)
    # The last emitted grade is the grade as of the latest event.
    assert sa.grades == ea.grades
    assert ea.frequency == sum(1 for _, kind, _ in events if kind == "purchase")
    assert ea.monetary_minor == sum(f if k == "purchase" else -f for _, k, f in events if k != "visit")


def test_an_event_older_than_a_clock_regrade_does_not_undo_it():
    """After the clock graded a customer as of T, an older (late, allowed) event is applied in its
    bucket but graded as of T: the clock's downgrade is not flipped back by stale time."""
    from datetime import datetime, timezone

    import orjson

    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from rules.schedule import regrade
    from rules.state import CustomerState
    from streams.processor import TRANSACTIONS, Record, process_batch

    rs = compile_ruleset(load("rfm-5"))
    now = datetime(2026, 11, 23, tzinfo=timezone.utc)
    store: dict[str, bytes] = {}

    def txn(offset: int, at: str, amount: str) -> Record:
        doc = {"event_id": f"e{offset}", "customer_id": "kim", "occurred_at": at, "type": "purchase",
               "amount": amount, "currency": "CNY"}
        return Record(TRANSACTIONS, "t", 0, offset, b"kim", orjson.dumps(doc))

    # Six purchases of 5000 in six days: R5 F4 M4 = 13 → S.
    first = process_batch([txn(i, f"2026-03-0{i + 1}T10:00:00+08:00", "5000") for i in range(6)], rs, store, now)
    store["kim"] = first.states["kim"][0]
    assert orjson.loads(first.grade_changes[-1][1])["grade"] == "S"

    # The clock, 40 days after the last purchase: R3 F4 M4 = 11 → A.
    state = CustomerState.from_bytes(store["kim"])
    clock_time = datetime(2026, 4, 15, tzinfo=rs.tz)
    changes, _ = regrade("kim", rs, state, clock_time, now)
    assert [(c["previous_grade"], c["grade"]) for c in changes] == [("S", "A")]
    store["kim"] = state.to_bytes()

    # A small purchase that happened before the clock's instant arrives late.
    late = process_batch([txn(6, "2026-03-07T10:00:00+08:00", "1")], rs, store, now)
    after = [orjson.loads(v) for _, v in late.grade_changes]
    # Graded as of the clock's instant (39 days since the last purchase → still R3): no change back to S.
    assert after == []
    assert late.applied == 1


@pytest.mark.parametrize("horizon", [timedelta(0), timedelta(days=7)])
def test_with_a_clock_each_written_customer_gets_its_first_look(horizon) -> None:
    from rules import risk

    f, _ = scripted()
    store = DictStore()
    result = process_batch(f.records, RS, store, NOW, clock_horizon=horizon)
    store.save(result)
    assert set(result.looks) == set(result.states) == {"alice", "bob", "carol"}
    for customer_id, (last_ts, look) in result.looks.items():
        state = CustomerState.from_bytes(store[customer_id])
        # the same the clock's timer computed from the stored bytes before
        assert (last_ts, look) == (state.last_event_ts, risk.first_look(RS, state, horizon))
        assert look is not None  # rfm-5's recency moves with time: everyone has a next look
    without = process_batch(f.records, RS, DictStore(), NOW)
    assert without.looks == {} and without.states.keys() == result.states.keys()


def test_a_batch_holds_its_change_documents_in_allocations_of_their_size() -> None:
    # A batch's documents are held until the outbox is acked: as orjson outputs, 4 KiB each.
    feed = Feed()
    for i in range(2000):
        feed.txn(f"c{i:05d}", "2026-06-01T10:00:00+08:00", "500.00")
    before = malloc_in_use()
    result = process_batch(feed.records, RS, DictStore(), NOW)
    changes = result.grade_changes
    assert len(changes) == 2000 and all(len(doc) < 2048 for _, doc in changes)
    del result
    per_change = (malloc_in_use() - before) / len(changes)
    assert per_change < 2048, per_change


class BatchReadStore(DictStore):
    """A store with ``get_many``, as the worker's memory store: it records how it was read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[str]] = []

    def get(self, customer_id: str, default: Any = None) -> Any:
        raise AssertionError("a store with get_many is read a batch at a time")

    def get_many(self, customer_ids: list[str]) -> list[bytes | None]:
        self.reads.append(list(customer_ids))
        return [dict.get(self, c) for c in customer_ids]


def test_a_store_with_get_many_is_read_once_per_batch_in_the_order_customers_first_appear() -> None:
    feed = Feed()
    feed.txn("bo", "2026-06-01T10:00:00+08:00", "100.00")
    feed.txn("al", "2026-06-01T11:00:00+08:00", "50.00")
    feed.txn("bo", "2026-06-02T10:00:00+08:00", "70.00")
    batches = [list(feed.records)]
    feed.txn("al", "2026-06-03T10:00:00+08:00", "900.00")
    batches.append(feed.records[3:])
    store, plain = BatchReadStore(), DictStore()
    for batch in batches:
        store.save(process_batch(batch, RS, store, NOW))
        plain.save(process_batch(batch, RS, plain, NOW))
    assert store.reads == [["bo", "al"], ["al"]]
    assert dict(store) == dict(plain) and set(plain) == {"al", "bo"}  # the same states as read one by one
