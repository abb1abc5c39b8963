"""Shadow rulesets in the hot path and the clock, without a broker: the active outputs are untouched,
the shadow grades are what the candidate alone would give, and a record is due exactly when a
customer's pair of grades changes."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from rules import shadow
from rules.engine import CompiledRuleset, compile_ruleset, evaluate
from rules.ruleset import load
from rules.state import CustomerState
from schemas.events import ShadowDiff
from streams.processor import TRANSACTIONS, BatchResult, Record, process_batch
from streams.settings import shadow_diffs_topic
from streams.settings import load_settings
from streams.shadow import ShadowStats
from tests.rules.shadowhelp import RFM5, candidate
from tests.streams.partitionhelp import customers_on, partition_of
from tests.streams.shadowhelp import history
from tests.streams.test_clock import make_clock

RS = compile_ruleset(load("rfm-5"))
SHADOWS = shadow.prepare(RS, [candidate()])
NOW = datetime(2026, 7, 1, 12, tzinfo=timezone.utc)
PARTITIONS = 4


def records(docs: list[dict[str, Any]]) -> list[Record]:
    out = []
    offsets = [0] * PARTITIONS
    for doc in docs:
        key = str(doc["customer_id"]).encode()
        p = partition_of(key, PARTITIONS)
        out.append(Record(TRANSACTIONS, "transactions", p, offsets[p], key, orjson.dumps(doc)))
        offsets[p] += 1
    return out


class Store(dict):
    def get(self, customer_id: str) -> bytes | None:  # type: ignore[override]
        return dict.get(self, customer_id)


def grade_all(rs: CompiledRuleset, recs: list[Record], shadows: tuple[CompiledRuleset, ...] = (),
              batch: int = 37) -> tuple[Store, list[BatchResult]]:
    """The handler's loop with the event clock: stream times carried from batch to batch."""
    store = Store()
    stream: dict[int, float] = {}
    results = []
    for start in range(0, len(recs), batch):
        result = process_batch(recs[start:start + batch], rs, store, NOW, clock_horizon=timedelta(0),
                               stream_time=stream, shadows=shadows)
        for customer_id, (raw, _) in result.states.items():
            store[customer_id] = raw
        stream = dict(result.stream_time)
        results.append(result)
    return store, results


def without_shadow(raw: bytes) -> bytes:
    state = CustomerState.from_bytes(raw)
    state.shadow = {}
    return state.to_bytes()


def test_shadows_change_nothing_the_active_ruleset_outputs():
    recs = records(history())
    plain_store, plain = grade_all(RS, recs)
    store, shadowed = grade_all(RS, recs, SHADOWS)
    for a, b in zip(plain, shadowed):
        assert (a.grade_changes, a.alerts, a.dead_letters, a.looks.keys()) == \
               (b.grade_changes, b.alerts, b.dead_letters, b.looks.keys())
        assert not a.shadow_diffs and b.shadow_diffs
    assert {c: without_shadow(raw) for c, raw in store.items()} == dict(plain_store)
    assert all(b'"sh"' not in raw for raw in plain_store.values())  # no shadow, nothing of one in the state


def test_shadow_grades_are_the_candidates_own_and_the_topic_ends_on_them():
    recs = records(history())
    store, results = grade_all(RS, recs, SHADOWS)
    alone_store, _ = grade_all(SHADOWS[0], recs)
    latest: dict[str, dict[str, Any]] = {}
    for result in results:
        for key, value in result.shadow_diffs:
            doc = orjson.loads(value)
            ShadowDiff.model_validate(doc)
            assert doc["customer_id"] == key.decode()
            latest[key.decode()] = doc
    differing = 0
    for customer_id, raw in store.items():
        state = CustomerState.from_bytes(raw)
        mine = state.shadow["rfm-5@2"]["g"]
        assert mine == CustomerState.from_bytes(alone_store[customer_id]).grades, customer_id
        doc = latest[customer_id]  # every graded customer has a record; its latest is the truth now
        assert doc["grades"] == state.grades and doc["shadows"][0]["grades"] == mine
        assert doc["differs"] == (mine != state.grades)
        differing += doc["differs"]
    assert 0 < differing < len(store)


def test_a_record_when_the_pair_changes_and_one_when_it_stops_differing():
    c = "alice"

    def txn(n: int, when: str, amount: str) -> dict[str, Any]:
        return {"event_id": f"e{n}", "customer_id": c, "occurred_at": when, "type": "purchase", "amount": amount,
                "currency": "CNY"}

    recs = records([txn(0, "2026-03-10T10:00:00+08:00", "2000"),  # R5 F1 M2 = 8: B under both
                    txn(1, "2026-03-10T11:00:00+08:00", "2000"),  # F2, 4000: B (9) under rfm-5, A (10) under the candidate
                    txn(2, "2026-03-10T12:00:00+08:00", "10"),  # F3: 10 → A under rfm-5, 11 → A: agree again
                    txn(3, "2026-03-10T13:00:00+08:00", "10")])  # nothing changes: no record
    store = Store()
    docs = []
    for record in recs:
        result = process_batch([record], RS, store, NOW, shadows=SHADOWS)
        store.update({k: raw for k, (raw, _) in result.states.items()})
        docs.append([orjson.loads(v) for _, v in result.shadow_diffs])
    assert [[(d["grades"], d["shadows"][0]["grades"], d["differs"]) for d in batch] for batch in docs] == [
        [({"value": "B"}, {"value": "B"}, False)],  # first evaluation: said once, agreeing
        [({"value": "B"}, {"value": "A"}, True)],
        [({"value": "A"}, {"value": "A"}, False)],  # stopped differing: said so
        []]
    assert docs[1][0]["shadows"][0]["differences"][0]["direction"] == "upgrade"


def test_shadows_of_an_earlier_run_are_dropped_when_none_runs():
    store, _ = grade_all(RS, records(history(customers=5, events=20)), SHADOWS)
    more = records(history(customers=5, events=40))[20:]
    for r in more:
        r.offset += 100
    store2 = Store(store)
    result = process_batch(more, RS, store2, NOW)
    assert not result.shadow_diffs
    assert result.states and all(b'"sh"' not in raw for raw, _ in result.states.values())


def test_the_clock_wakes_a_customer_where_time_moves_only_the_shadow_grade():
    clock, table, store, log, settings = make_clock("event")
    clock.shadows = SHADOWS
    clock.app.gradeflow_shadow = stats = ShadowStats(SHADOWS)
    alone, alone_table, alone_store, alone_log, _ = make_clock("event")
    alone.rs = SHADOWS[0]
    asyncio.run(clock.rebuild())
    asyncio.run(alone.rebuild())
    key, pusher = customers_on(0, 2)

    def txn(customer: str, when: str, amount: str, offset: int) -> Record:
        doc = {"event_id": f"{customer}-{offset}", "customer_id": customer, "occurred_at": when, "type": "purchase",
               "amount": amount, "currency": "CNY"}
        return Record(TRANSACTIONS, settings.topics.transactions, 0, offset, customer.encode(), orjson.dumps(doc))

    def feed(c: Any, t: dict, s: Any, rs: CompiledRuleset, recs: list[Record], shadows: tuple = ()) -> BatchResult:
        result = process_batch(recs, rs, s, NOW, clock_horizon=c.look_horizon,
                               stream_time=c.stream_times({r.partition for r in recs}), shadows=shadows)
        for customer_id, (raw, _) in result.states.items():
            t[customer_id.encode()] = raw
        for k, raw, _p in c.advanced(result.stream_time):
            t[k] = raw
        c.note(result.looks, result.states)
        return result

    # key: 2 × 2500 on 03-10 → R5 F2 M3 = 10: A under both. The candidate's R5 ends after 3 days
    # (A → B at 03-14 00:00), rfm-5's after 7 (A → B at 03-18 00:00).
    first = [txn(key, "2026-03-10T10:00:00+08:00", "2500", 0), txn(key, "2026-03-10T11:00:00+08:00", "2500", 1)]
    feed(clock, table, store, RS, first, SHADOWS)
    feed(alone, alone_table, alone_store, SHADOWS[0], first)
    asyncio.run(clock.tick())
    asyncio.run(alone.tick())
    log.clear()
    push = [txn(pusher, "2026-03-15T09:00:00+08:00", "1", 2)]  # the partition's time passes 03-14 only
    feed(clock, table, store, RS, push, SHADOWS)
    active_part = without_shadow(table[key.encode()])
    feed(alone, alone_table, alone_store, SHADOWS[0], push)
    asyncio.run(clock.tick())
    asyncio.run(alone.tick())
    assert stats.counts() == {"rfm-5@2": 1} and stats.records == 1  # the wake counted it as differing
    topic = shadow_diffs_topic(settings)
    sent = [(e[1], e[3]) for e in log if e[0] == "send" and e[2] == key.encode()]
    assert [t for t, _ in sent] == [topic]  # no grade change, no alert: only the shadow's record
    doc = sent[0][1]
    assert doc["grades"] == {"value": "A"} and doc["shadows"][0]["grades"] == {"value": "B"}
    assert doc["shadows"][0]["differences"][0]["alert"] == "critical"
    # the active ruleset graded the customer last at their event; time alone moved the shadow since
    assert (doc["as_of"], doc["shadows"][0]["as_of"]) == ("2026-03-10T11:00:00+08:00", "2026-03-14T00:00:00+08:00")
    state = CustomerState.from_bytes(table[key.encode()])
    assert state.grades == {"value": "A"}
    assert without_shadow(table[key.encode()]) == active_part  # a shadow-only wake wrote the shadow alone
    assert state.shadow["rfm-5@2"]["g"] == CustomerState.from_bytes(alone_table[key.encode()]).grades == {"value": "B"}
    # the candidate alone changed at the same instant as its shadow did
    alone_change = [e[3] for e in alone_log if e[0] == "send" and e[2] == key.encode() and "direction" in e[3]]
    assert [(c["previous_grade"], c["grade"], c["as_of"]) for c in alone_change][-1] == \
        ("A", "B", "2026-03-14T00:00:00+08:00")
    assert state.shadow["rfm-5@2"]["s"]["@clock"] == datetime(2026, 3, 14, tzinfo=timezone(timedelta(hours=8))).timestamp()


def test_a_shadow_that_cannot_run_is_refused_at_start(tmp_path, clean_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RFM5.replace("window_days: 365", "window_days: oops"), encoding="utf-8")
    from schemas.errors import ConfigurationError, RulesetError
    from streams.shadow import load_shadows

    clean_env.setenv("GRADEFLOW_SHADOW_RULESETS", f"{bad}")
    with pytest.raises(RulesetError) as exc:
        load_shadows(load_settings(), RS)
    assert exc.value.source == f"{bad} (GRADEFLOW_SHADOW_RULESETS)"
    assert any(p.startswith("window_days (line ") for p in exc.value.problems), exc.value.problems
    clean_env.setenv("GRADEFLOW_SHADOW_RULESETS", "rfm-5")
    with pytest.raises(ConfigurationError, match="GRADEFLOW_SHADOW_RULESETS: rfm-5@1: version '1' is the active"):
        load_shadows(load_settings(), RS)


class SweepStore:
    """The table's store as the sweeps use it: states by key, on one input partition."""

    def __init__(self, held: dict[bytes, bytes]) -> None:
        self.held = held
        self.writes: list[bytes] = []

    def partition_items(self, partitions: Any) -> list[tuple[bytes, int, bytes]]:
        return [(k, 0, v) for k, v in self.held.items()]

    def get_keys(self, keys: list[bytes]) -> list[bytes | None]:
        return [self.held.get(k) for k in keys]

    async def replace(self, producer: Any, writes: Any) -> list[bytes]:
        for key, old, new, _partition in writes:
            assert self.held[key] == old
            self.held[key] = new
            self.writes.append(key)
        return []


def sweep_app(settings: Any, log: list) -> Any:
    from types import SimpleNamespace

    from tests.streams.producerhelp import RecordingProducer

    tps = [SimpleNamespace(topic=settings.topics.transactions, partition=0)]
    return SimpleNamespace(producer=RecordingProducer(log, 1, decode=orjson.loads),
                           assignor=SimpleNamespace(assigned_actives=lambda: tps))


def test_a_shadow_configured_later_follows_every_customer_at_the_next_recovery():
    from streams.settings import Settings
    from streams.shadow import ShadowSweep

    plain, _ = grade_all(RS, records(history()))  # graded while no shadow ran
    held = {k.encode(): v for k, v in plain.items()}
    settings = Settings(app_id="t", partitions=1)
    log: list = []
    store = SweepStore(dict(held))
    stats = ShadowStats(SHADOWS)
    sweep = ShadowSweep(sweep_app(settings, log), settings, RS, SHADOWS, store, stats, asyncio.Lock())
    assert asyncio.run(sweep.sweep()) == len(held)
    sent = {e[2].decode(): e[3] for e in log if e[0] == "send"}
    assert set(sent) == set(plain) and {e[1] for e in log if e[0] == "send"} == {shadow_diffs_topic(settings)}
    differing = 0
    for customer_id, doc in sent.items():
        state = CustomerState.from_bytes(store.held[customer_id.encode()])
        # as of the instant the active ruleset graded the customer: the candidate's grade there
        alone = CustomerState.from_bytes(plain[customer_id])
        alone.grades, alone.grade_since = {}, {}
        at = datetime.fromtimestamp(alone.last_event_ts, SHADOWS[0].tz)  # type: ignore[arg-type]
        assert state.shadow["rfm-5@2"]["g"] == evaluate(SHADOWS[0], alone, at).grades
        assert doc["shadows"][0]["grades"] == state.shadow["rfm-5@2"]["g"] and doc["grades"] == state.grades
        assert without_shadow(store.held[customer_id.encode()]) == plain[customer_id]  # the active part unchanged
        differing += doc["differs"]
    assert stats.counts() == {"rfm-5@2": differing} and differing > 0
    # a second recovery finds them all following: nothing to grade, write or publish
    log.clear()
    assert asyncio.run(sweep.sweep()) == 0 and not [e for e in log if e[0] == "send"]
    assert stats.counts() == {"rfm-5@2": differing}


def test_a_new_active_version_regrades_with_its_shadows_following():
    from streams.rules_start import plan

    plain, _ = grade_all(RS, records(history(customers=30, events=90)), SHADOWS)
    v3 = candidate("3", recency=False, monetary=False, **{"- {min: 10, grade: A}": "- {min: 11, grade: A}"})
    shadows = shadow.prepare(v3, [candidate()])
    diffs: list[tuple[bytes, bytes]] = []
    signatures: dict[bytes, tuple[Any, ...]] = {}
    items = [(k.encode(), v) for k, v in plain.items()]
    changes, _alerts, states = plan(v3, items, None, shadows, diffs, signatures)
    assert set(states) == set(signatures) == {k for k, _ in items}
    for key, (_old, new) in states.items():
        state = CustomerState.from_bytes(new)
        assert state.ruleset == "rfm-5@3"
        assert state.shadow["rfm-5@2"] == CustomerState.from_bytes(plain[key.decode()]).shadow["rfm-5@2"]
    # a record for exactly the customers whose active grade the new version changed
    moved = {k for k, _ in changes}
    assert moved and {k for k, _ in diffs} == moved
    for key, value in diffs:
        doc = orjson.loads(value)
        assert doc["ruleset"] == {"id": "rfm-5", "version": "3"}
        assert doc["grades"] == CustomerState.from_bytes(states[key][1]).grades


def test_the_worker_refuses_to_start_with_a_shadow_it_cannot_run(tmp_path, clean_env, capsys):
    from streams.tools.cli import main

    longer = tmp_path / "longer.yaml"
    longer.write_text(RFM5.replace('version: "1"', 'version: "2"').replace("window_days: 365", "window_days: 730"),
                      encoding="utf-8")
    clean_env.setenv("GRADEFLOW_SHADOW_RULESETS", f"rfm-5, {longer}")
    clean_env.setenv("GRADEFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # refused before any broker is asked
    assert main(["worker"]) == 1
    err = capsys.readouterr().err
    assert "GRADEFLOW_SHADOW_RULESETS: rfm-5@1: version '1' is the active ruleset's" in err
    assert "rfm-5@2: needs 730 days of history; the active ruleset keeps 365" in err


def test_a_promotion_of_the_shadow_stops_it_and_the_others_follow_the_new_active_ruleset():
    from types import SimpleNamespace

    from streams.shadow import ShadowSweep, beside, switch_active

    promoted = SHADOWS[0]
    kept, dropped = beside(promoted, SHADOWS)
    assert kept == () and len(dropped) == 1 and promoted.key in dropped[0]
    # Back to the first version (a rollback): the candidate runs beside it again.
    assert beside(RS, SHADOWS) == (SHADOWS, [])

    settings = load_settings(ruleset="rfm-5")
    sweep = ShadowSweep(SimpleNamespace(), settings, RS, SHADOWS, {}, ShadowStats(SHADOWS), asyncio.Lock())
    app = SimpleNamespace(gradeflow_shadow_sweep=sweep)
    grader, clock, regrade = (SimpleNamespace(shadows=SHADOWS) for _ in range(3))
    switch_active(app, promoted, grader, clock, regrade)
    assert sweep.active is promoted and sweep.shadows == () == grader.shadows == clock.shadows == regrade.shadows
    # Customers graded after the switch: what the promoted ruleset held as a shadow goes with their
    # next write, and they are re-graded by it (cause rules) before their event.
    store, _ = grade_all(RS, records(history(customers=5, events=20)), SHADOWS)
    assert all(CustomerState.from_bytes(raw).shadow for raw in store.values())
    more = records(history(customers=5, events=40))[20:]
    for r in more:
        r.offset += 100
    result = process_batch(more, promoted, Store(store), NOW, shadows=grader.shadows, promotion_id="p-1")
    assert not result.shadow_diffs and result.states
    for raw, _record in result.states.values():
        state = CustomerState.from_bytes(raw)
        assert state.shadow == {} and state.ruleset == promoted.key
