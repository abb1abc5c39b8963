"""streams/clock.py without a broker: schedules per partition, wakes only the due, writes after sending."""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from types import SimpleNamespace

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import load
from rules.schedule import midnight
from streams.clock import Clock
from tests.streams.partitionhelp import partition_of
from streams.processor import TRANSACTIONS, Record, process_batch, utcnow
from streams.settings import Settings
from tests.rules.rulehelp import SHANGHAI
from tests.streams.partitionhelp import customers_on
from tests.streams.producerhelp import RecordingProducer

RS = compile_ruleset(load("rfm-5"))


class FakeTable(dict):
    pass


class FakeStore:
    def __init__(self, table: FakeTable, log: list, partitions: int) -> None:
        self.table, self.log, self.partitions = table, log, partitions

    def partition_items(self, partitions):
        return [(k, partition_of(k, self.partitions), v) for k, v in self.table.items()
                if not k.startswith(b"\x00") and partition_of(k, self.partitions) in partitions]

    def get(self, customer_id: str):
        return self.table.get(customer_id.encode())

    def get_key(self, key: bytes):
        return self.table.get(key)

    async def replace(self, producer, writes):
        skipped = []
        for key, old, new, partition in writes:
            if self.table.get(key) != old:
                skipped.append(key)
                continue
            self.table[key] = new
            self.log.append(("write", key.decode(), partition))
        return skipped


def assert_outputs_durable_before_state(log: list) -> None:
    """Every output was sent and acked before the first state write (as the batch handler does)."""
    first_write = next(i for i, e in enumerate(log) if e[0] == "write")
    before, after = log[:first_write], log[first_write:]
    assert any(e[0] == "send" for e in before) and all(e[0] not in ("send", "ack") for e in after)
    sent = {(e[1], partition_of(e[2], 4)) for e in before if e[0] == "send"}
    assert sent == {(e[1], e[2]) for e in before if e[0] == "ack"}  # every batch sent was acked


def make_clock(mode: str, partitions: int = 4, active=(0, 1, 2, 3), horizon: float = 0):
    # horizon 0: no at-risk warnings (their own tests below ask for them)
    settings = Settings(clock=mode, partitions=partitions, app_id="t", at_risk_horizon_days=horizon)
    log: list = []
    table = FakeTable()
    store = FakeStore(table, log, partitions)
    tps = [SimpleNamespace(topic=settings.topics.transactions, partition=p) for p in active]
    app = SimpleNamespace(producer=RecordingProducer(log, partitions, decode=orjson.loads), assignor=SimpleNamespace(assigned_actives=lambda: tps),
                          gradeflow_population=None)
    return Clock(app, settings, RS, table, store), table, store, log, settings


def txn(settings, customer: str, at: str, amount: str, offset: int) -> Record:
    doc = {"event_id": f"{customer}-{offset}", "customer_id": customer, "occurred_at": at, "type": "purchase",
           "amount": amount, "currency": "CNY"}
    key = customer.encode()
    return Record(TRANSACTIONS, settings.topics.transactions, partition_of(key, settings.partitions), offset, key,
                  orjson.dumps(doc))


def feed(clock, table, store, settings, records):
    """What the batch handler does (streams/app.py), without a broker."""
    result = process_batch(records, RS, store, utcnow(), clock_horizon=clock.look_horizon,
                           stream_time=clock.stream_times({r.partition for r in records}))
    for customer_id, (raw, _) in result.states.items():
        table[customer_id.encode()] = raw
    for key, raw, _partition in clock.advanced(result.stream_time):
        table[key] = raw
    clock.note(result.looks, result.states)
    return result


def test_event_clock_wakes_only_due_customers_of_their_partition():
    clock, table, store, log, settings = make_clock("event")
    asyncio.run(clock.rebuild())
    key, pusher, idle = customers_on(0, 3)
    other = customers_on(1, 1)[0]
    # key: R5 F2 M3 = 10 → A; 8 days later R4 → B (due 2026-03-18 00:00 local)
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2026-03-10T11:00:00+08:00", "2500", 1),
                                         txn(settings, idle, "2026-03-10T09:00:00+08:00", "1", 2)])
    asyncio.run(clock.tick())
    # scheduled at a cheap lower bound (the first candidate: recency past 7 days), here its change
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 3, 18).toordinal(), SHANGHAI).timestamp()
    assert clock.schedules[0].is_exact(key.encode()) is False  # first_look: a lower bound
    log.clear()
    # another partition's stream time passing the due instant does not wake it
    feed(clock, table, store, settings, [txn(settings, other, "2026-04-01T10:00:00+08:00", "1", 3)])
    assert asyncio.run(clock.tick()) == 0 and not log
    # its own partition's stream time passing it does, with the exact instant as as_of
    feed(clock, table, store, settings, [txn(settings, pusher, "2026-03-18T00:00:00+08:00", "1", 4)])
    assert asyncio.run(clock.tick()) == 2  # key (due 03-18) and idle (B → C at 03-18 too)
    sends = [e for e in log if e[0] == "send"]
    mine = [e[3] for e in sends if e[2] == key.encode()]
    assert [(c["previous_grade"], c["grade"], c["cause"]["kind"], c["as_of"]) for c in mine if "direction" in c] == [
        ("A", "B", "clock", "2026-03-18T00:00:00+08:00")]
    assert [a["grade_change_event_id"] for a in mine if "alert_id" in a] == [mine[0]["event_id"]]
    # outputs, acked by the broker, then the state writes
    assert_outputs_durable_before_state(log)
    # nothing is due again until the next instant: no more wakes at the same stream time
    log.clear()
    assert asyncio.run(clock.tick()) == 0 and not log


def test_a_rebuilt_schedule_resumes_after_the_clock_change_and_covers_only_active_partitions():
    clock, table, store, log, settings = make_clock("event")
    asyncio.run(clock.rebuild())
    key, pusher = customers_on(0, 2)
    other = customers_on(1, 1)[0]
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2026-03-10T11:00:00+08:00", "2500", 1),
                                         txn(settings, other, "2026-03-10T11:00:00+08:00", "2500", 2),
                                         txn(settings, pusher, "2026-03-20T00:00:00+08:00", "60000", 3)])
    asyncio.run(clock.tick())
    changes = [e for e in log if e[0] == "send" and e[2] == key.encode() and "direction" in e[3]]
    assert len(changes) == 1
    # a new worker that owns only partition 0 rebuilds from the same table: stream time and
    # schedule come back; the change already made is not made again
    clock2, _, _, log2, _ = make_clock("event", active=(0,))
    clock2.table.update(table)
    asyncio.run(clock2.rebuild())
    assert set(clock2.schedules) == {0}
    assert clock2.stream_time[0] == datetime.fromisoformat("2026-03-20T00:00:00+08:00").timestamp()
    assert asyncio.run(clock2.tick()) == 0 and not log2
    assert clock2.schedules[0].get(other.encode()) is None


def test_wall_clock_catches_up_in_order_with_one_change_per_instant():
    clock, table, store, log, settings = make_clock("wall")
    asyncio.run(clock.rebuild())
    key = customers_on(0, 1)[0]
    feed(clock, table, store, settings, [txn(settings, key, "2025-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2025-03-10T11:00:00+08:00", "2500", 1)])
    asyncio.run(clock.tick())
    got = [(e[3]["previous_grade"], e[3]["grade"], e[3]["as_of"]) for e in log if e[0] == "send" and "direction" in e[3]]
    # A → B at R4 (day 8), B → C at R1 (day 121: 1+2+3 = 6), C → D when both purchases leave the
    # window (day 365: 1+1+1): every change at its own instant, in order, in one tick
    assert got == [("A", "B", "2025-03-18T00:00:00+08:00"), ("B", "C", "2025-07-09T00:00:00+08:00"),
                   ("C", "D", "2026-03-10T00:00:00+08:00")]
    assert asyncio.run(clock.tick()) == 0


def test_off_does_nothing():
    clock, table, store, log, settings = make_clock("off")
    assert clock.look_horizon is None  # so the hot path computes no looks
    clock.note({"x": (1.0, 2.0)}, {"x": (b"", SimpleNamespace(partition=0))})
    assert not clock.pending and asyncio.run(clock.tick()) == 0


@pytest.mark.parametrize("mode", ["wall", "event", "off"])
def test_settings_accept_the_clocks(mode):
    assert Settings(clock=mode).clock == mode


def test_an_idle_partition_follows_wall_time_only_when_asked():
    clock, table, store, log, settings = make_clock("event")
    asyncio.run(clock.rebuild())
    key = customers_on(0, 1)[0]
    feed(clock, table, store, settings, [txn(settings, key, "2025-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2025-03-10T11:00:00+08:00", "2500", 1)])
    asyncio.run(clock.absorb())
    stream = datetime.fromisoformat("2025-03-10T11:00:00+08:00").timestamp()
    assert clock.now(0) == stream and clock.now(1) is None  # by design: no events, no time
    assert asyncio.run(clock.tick()) == 0
    clock.idle_s = 0.01  # GRADEFLOW_EVENT_CLOCK_IDLE_S
    clock.advanced_at[0] -= 1.0
    clock.started -= 1.0  # partition 1 never had an event since the worker started
    assert clock.now(0) > stream + 365 * 86400 and clock.now(1) is not None
    assert asyncio.run(clock.tick()) == 1  # the key customer, through every change up to now
    assert [e[3]["grade"] for e in log if e[0] == "send" and "direction" in e[3]] == ["B", "C", "D"]


def test_a_customer_scheduled_at_the_lower_bound_is_moved_to_its_real_due_instant_without_a_change():
    clock, table, store, log, settings = make_clock("event")
    asyncio.run(clock.rebuild())
    key, pusher = customers_on(0, 2)
    # R5 F1 M5 = 11: A; recency past 7 days (03-18) gives R4 = 10, still A; past 30 (04-10) R3: B
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-10T10:00:00+08:00", "60000", 0)])
    asyncio.run(clock.tick())
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 3, 18).toordinal(), SHANGHAI).timestamp()
    log.clear()
    feed(clock, table, store, settings, [txn(settings, pusher, "2026-03-18T12:00:00+08:00", "1", 1)])
    asyncio.run(clock.tick())  # the key customer is looked at (03-18 00:00) but not re-graded
    assert not [e for e in log if e[0] == "send" and e[2] == key.encode()]
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 4, 10).toordinal(), SHANGHAI).timestamp()
    assert clock.schedules[0].is_exact(key.encode())


# ---------------------------------------------------------------- at-risk warnings (rules/risk.py)


def at_risk(log: list, customer: str) -> list[dict]:
    return [e[3] for e in log if e[0] == "send" and e[2] == customer.encode() and e[3].get("kind") == "at_risk"]


def test_a_key_customer_is_warned_once_a_horizon_before_the_clock_downgrades_them():
    from schemas.events import Alert

    clock, table, store, log, settings = make_clock("event", horizon=7)
    asyncio.run(clock.rebuild())
    key, pusher, small = customers_on(0, 3)
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2026-03-10T11:00:00+08:00", "2500", 1),
                                         txn(settings, small, "2026-03-10T09:00:00+08:00", "1", 2)])
    asyncio.run(clock.tick())
    # the drop (03-18 00:00) is more than 7 days ahead: none yet; woken again when it enters the horizon
    assert at_risk(log, key) == []
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 3, 11).toordinal(), SHANGHAI).timestamp()
    log.clear()
    feed(clock, table, store, settings, [txn(settings, pusher, "2026-03-12T10:00:00+08:00", "1", 3)])
    asyncio.run(clock.tick())
    [warning] = at_risk(log, key)
    Alert.model_validate(warning)
    assert (warning["previous_grade"], warning["grade"], warning["due_at"], warning["as_of"], warning["severity"]) == (
        "A", "B", "2026-03-18T00:00:00+08:00", "2026-03-11T00:00:00+08:00", "info")
    assert not [e for e in log if e[0] == "send" and e[2] == key.encode() and "direction" in e[3]]  # no change yet
    assert at_risk(log, small) == [] and at_risk(log, pusher) == []  # not key customers
    # sent and acked, then the state (with the mark) written
    assert_outputs_durable_before_state(log)
    assert ("write", key, 0) in log
    assert clock.stats.at_risk == 1
    # more stream time, a restart (rebuild from the table): no second warning; then the downgrade
    log.clear()
    clock2, _, _, log2, _ = make_clock("event", horizon=7)
    clock2.table.update(table)
    asyncio.run(clock2.rebuild())
    asyncio.run(clock2.tick())
    feed(clock2, clock2.table, clock2.store, settings, [txn(settings, pusher, "2026-03-16T10:00:00+08:00", "1", 4)])
    asyncio.run(clock2.tick())
    assert at_risk(log2, key) == []
    feed(clock2, clock2.table, clock2.store, settings, [txn(settings, pusher, "2026-03-19T10:00:00+08:00", "1", 5)])
    asyncio.run(clock2.tick())
    mine = [e[3] for e in log2 if e[0] == "send" and e[2] == key.encode()]
    assert [(d.get("kind"), d.get("grade")) for d in mine if "alert_id" in d] == [(None, "B")]  # the downgrade
    [change] = [d for d in mine if "direction" in d]
    assert change["event_id"] == warning["grade_change_event_id"]


def test_a_purchase_within_the_horizon_moves_the_drop_and_warns_again_only_when_the_new_one_is_near():
    clock, table, store, log, settings = make_clock("event", horizon=7)
    asyncio.run(clock.rebuild())
    key, pusher = customers_on(0, 2)
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-10T10:00:00+08:00", "2500", 0),
                                         txn(settings, key, "2026-03-10T11:00:00+08:00", "2500", 1),
                                         txn(settings, pusher, "2026-03-12T10:00:00+08:00", "1", 2)])
    asyncio.run(clock.tick())
    assert [w["due_at"] for w in at_risk(log, key)] == ["2026-03-18T00:00:00+08:00"]
    log.clear()
    # bought again: A (R5 F3 M3); the next drop is when recency passes 30 days (R3: 9, B) on 04-16
    feed(clock, table, store, settings, [txn(settings, key, "2026-03-16T09:00:00+08:00", "100", 3)])
    asyncio.run(clock.tick())
    assert at_risk(log, key) == []
    # first at the lower bound: recency past 7 days (03-24) could drop a grade, 7 days before that
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 3, 17).toordinal(), SHANGHAI).timestamp()
    feed(clock, table, store, settings, [txn(settings, pusher, "2026-03-17T10:00:00+08:00", "1", 4)])
    asyncio.run(clock.tick())
    assert at_risk(log, key) == []  # R4 on 03-24 keeps A: the real drop is 04-16, its warning 04-09
    assert clock.schedules[0].get(key.encode()) == midnight(date(2026, 4, 9).toordinal(), SHANGHAI).timestamp()
    feed(clock, table, store, settings, [txn(settings, pusher, "2026-04-10T10:00:00+08:00", "1", 5)])
    asyncio.run(clock.tick())
    assert [(w["due_at"], w["as_of"]) for w in at_risk(log, key)] == [
        ("2026-04-16T00:00:00+08:00", "2026-04-09T00:00:00+08:00")]
    assert not [e for e in log if e[0] == "send" and e[2] == key.encode() and "direction" in e[3]]
