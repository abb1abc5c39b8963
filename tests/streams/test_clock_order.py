"""The clock and the batch handler in every interleaving, without a broker.

Long generated histories (several partitions placed by an arbitrary partitioner, event time over
more than a year, refunds, late events) go through what the worker does: batches of random
sizes through ``process_batch`` with the event clock's stream times, the clock's timer ticking at
random points between them, and crashes that lose a batch's state writes after its outputs were
published, followed by a restart that rebuilds the clock from the table and replays the batch.
Whatever the interleaving, ``streams.tools.audit`` finds every chain valid, every key downgrade with
exactly one alert, and the published changes equal to the offline run, customer by customer.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import load
from rules.state import CustomerState
from streams.tools.audit import Audit
from streams.clock import Clock
from streams.handler import BatchGrader
from streams.processor import TRANSACTIONS, Record, process_batch, utcnow
from streams.settings import Settings
from tests.streams.producerhelp import RecordingProducer

RS = compile_ruleset(load("rfm-5"))
PARTITIONS = 4
TZ = timezone(timedelta(hours=8))


def history(seed: int, customers: int = 60, events: int = 900) -> list[Record]:
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(customers)]
    # Any partitioner: a random one, fixed per customer.
    home = {c: rng.randrange(PARTITIONS) for c in names}
    start = datetime(2024, 1, 1, 9, tzinfo=TZ)
    t = start
    offsets = [0] * PARTITIONS
    out = []
    for n in range(events):
        t += timedelta(hours=rng.choice([1, 5, 12, 24]))  # ~13 months in all
        c = rng.choice(names)
        when = t - timedelta(days=rng.choice([0, 0, 0, 0, 2, 30]))  # some late, inside the lateness
        refund = rng.random() < 0.1
        doc = {"event_id": f"e{n}", "customer_id": c, "occurred_at": when.isoformat(),
               "type": "refund" if refund else "purchase",
               "amount": f"{rng.choice([80, 500, 2500, 9000]) * (0.5 if refund else 1):.2f}", "currency": "CNY"}
        p = home[c]
        out.append(Record(TRANSACTIONS, "t", p, offsets[p], c.encode(), orjson.dumps(doc),
                          int(when.timestamp() * 1000)))
        offsets[p] += 1
    return out


class Store:
    """The table: key → (input partition, bytes), as the worker's store keeps them."""

    def __init__(self) -> None:
        self.held: dict[bytes, tuple[int, bytes]] = {}
        self.down = False  # the process died: writes go nowhere

    def write_many(self, outbox, states):
        if not self.down:
            for key, raw, partition in states:
                self.held[key] = (partition, raw)

    def get(self, customer_id: str):
        got = self.held.get(customer_id.encode())
        return None if got is None else got[1]

    def get_key(self, key: bytes):
        got = self.held.get(key)
        return None if got is None else got[1]

    def partition_items(self, partitions):
        return [(k, p, raw) for k, (p, raw) in list(self.held.items()) if p in partitions and k[:1] != b"\x00"]

    async def replace(self, producer, writes):
        skipped = []
        for key, old, new, partition in writes:
            if self.get_key(key) != old:
                skipped.append(key)
            else:
                self.held[key] = (partition, new)
        return skipped


class Worker:
    """The handler and the clock of one worker process over a shared table (``wall``: the wall
    clock's time, for the wall clock)."""

    def __init__(self, store: Store, published: list, alerts: list, mode: str = "event",
                 wall: list[float] | None = None) -> None:
        settings = Settings(clock=mode, partitions=PARTITIONS, app_id="t", at_risk_horizon_days=0)
        self.wall = wall
        self.settings, self.store, self.published, self.alerts = settings, store, published, alerts
        self.log: list = []
        tps = [SimpleNamespace(topic=settings.topics.transactions, partition=p) for p in range(PARTITIONS)]
        app = SimpleNamespace(producer=RecordingProducer(self.log, PARTITIONS), gradeflow_population=None,
                              assignor=SimpleNamespace(assigned_actives=lambda: tps))
        self.clock = Clock(app, settings, RS, store, store, wall=(lambda: wall[0]) if wall is not None else time.time)
        self.grader = BatchGrader(settings, RS, store, self.clock, None, self.clock.writer, lambda: app.producer)
        asyncio.run(self.clock.rebuild())

    def _collect(self) -> None:
        names = self.settings.topics
        for entry in self.log:
            if entry[0] == "send" and entry[1] == names.grade_changes:
                self.published.append(entry[3])
            elif entry[0] == "send" and entry[1] == names.alerts:
                self.alerts.append(entry[3])
        self.log.clear()

    def batch(self, records: list[Record], crash: bool = False) -> None:
        """What streams/app.py's handler does (the same BatchGrader); ``crash``: the process dies
        once the outputs are published, before the states are written."""
        self.store.down = crash
        try:
            asyncio.run(self.grader.grade(records))
        finally:
            self.store.down = False
        self._collect()

    def tick(self) -> None:
        asyncio.run(self.clock.tick())
        self._collect()


@pytest.mark.parametrize("seed", range(12))
def test_every_interleaving_of_clock_handler_and_crash_agrees_with_the_offline_run(seed: int) -> None:
    rng = random.Random(1000 + seed)
    records = history(seed)
    store, published, alerts = Store(), list[bytes](), list[bytes]()
    worker = Worker(store, published, alerts)
    # Records reach the handler in fetches mixing partitions, each partition in its own order.
    queue = sorted(records, key=lambda r: r.offset + rng.random())  # partitions interleaved, each in order
    crashes = 0
    i = 0
    while i < len(queue):
        size = rng.choice([1, 3, 10, 40])
        batch = queue[i:i + size]
        if rng.random() < 0.03 or (not crashes and i >= len(queue) // 2):
            worker.batch(batch, crash=True)
            crashes += 1
            worker = Worker(store, published, alerts)  # restart: rebuilt from the table, batch replayed
            continue
        worker.batch(batch)
        i += size
        if rng.random() < 0.5:
            worker.tick()
    worker.tick()
    report = Audit(RS, clock="event").check(records, published, alerts)
    assert report.ok, report.render()
    assert report.agreeing_customers == report.customers and report.changes > 50
    clock_changes = len([v for v in published if orjson.loads(v)["cause"]["kind"] == "clock"])
    assert clock_changes > 10, "the history must make the clock work"
    assert crashes >= 1


def test_the_audit_finds_a_clock_change_computed_from_the_wrong_state() -> None:
    """The checker can fail: swap two of a customer's published changes, drop one, and it says so."""
    records = history(3)
    store, published, alerts = Store(), list[bytes](), list[bytes]()
    worker = Worker(store, published, alerts)
    for r in records:
        worker.batch([r])
    worker.tick()
    audit = Audit(RS, clock="event")
    assert audit.check(records, published, alerts).ok
    docs = [orjson.loads(v) for v in published]
    c = docs[0]["customer_id"]
    mine = [i for i, d in enumerate(docs) if d["customer_id"] == c]
    assert len(mine) >= 2
    swapped = list(published)
    swapped[mine[0]], swapped[mine[1]] = swapped[mine[1]], swapped[mine[0]]
    report = audit.check(records, swapped, alerts)
    assert not report.ok and "broken chains" in report.problems
    dropped = [v for i, v in enumerate(published) if i != mine[-1]]
    report = audit.check(records, dropped, alerts)
    assert "customers differing from offline" in report.problems


@pytest.mark.parametrize("seed", range(6))
def test_with_the_wall_clock_chains_hold_whoever_gets_to_a_customer_first(seed: int) -> None:
    """Events arrive a little after they happened, some exactly at a local midnight (the instant
    time alone changes grades), while the timer wakes customers as the wall clock passes their
    due instants: every chain stays valid, as_of never goes backwards, one alert per key downgrade."""
    rng = random.Random(2000 + seed)
    start = datetime(2026, 1, 1, tzinfo=TZ).timestamp()
    wall = [start]
    records = []
    offsets = [0] * PARTITIONS
    home = {f"c{i}": rng.randrange(PARTITIONS) for i in range(40)}
    t = start
    for n in range(700):
        t += rng.choice([600, 3600, 6 * 3600, 86400])
        when = datetime.fromtimestamp(t, TZ)
        if rng.random() < 0.2:  # exactly at a local midnight, where due instants are
            when = when.replace(hour=0, minute=0, second=0, microsecond=0)
        c = rng.choice(list(home))
        doc = {"event_id": f"e{n}", "customer_id": c, "occurred_at": when.isoformat(), "type": "purchase",
               "amount": rng.choice(["80.00", "500.00", "2500.00", "9000.00"]), "currency": "CNY"}
        p = home[c]
        records.append(Record(TRANSACTIONS, "t", p, offsets[p], c.encode(), orjson.dumps(doc), int(t * 1000)))
        offsets[p] += 1
    store, published, alerts = Store(), list[bytes](), list[bytes]()
    worker = Worker(store, published, alerts, mode="wall", wall=wall)
    i = 0
    while i < len(records):
        batch = records[i:i + rng.choice([1, 2, 5, 20])]
        # The wall clock: a little past the batch's latest event, sometimes exactly at it.
        wall[0] = max(wall[0], max(r.timestamp_ms or 0 for r in batch) / 1000 + rng.choice([0, 0, 1, 3600, 30000]))
        if rng.random() < 0.4:
            worker.tick()  # the timer first: it may reach a customer's due instant before their event
        worker.batch(batch)
        i += len(batch)
        if rng.random() < 0.4:
            worker.tick()
    wall[0] += 90 * 86400
    worker.tick()
    report = Audit(RS, clock="wall").check(records, published, alerts)
    assert report.ok, report.render()
    assert len([v for v in published if orjson.loads(v)["cause"]["kind"] == "clock"]) > 10


class SlowAcks(RecordingProducer):
    """The recording producer, with acknowledgements that take a random number of event-loop turns:
    the points where the handler and the clock's timer could interleave."""

    def __init__(self, log: list, rng: random.Random) -> None:
        super().__init__(log, PARTITIONS)
        self.rng = rng

    async def send_batch(self, batch, topic, partition):
        future = await super().send_batch(batch, topic, partition)
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)
        return future


class NoLock:
    """A lock that excludes nothing: the worker as it was before the writer lock."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class HandlerAsItWas:
    """The batch handler before the clock was ordered with it: no catch-up of a customer's time
    before their events, no writer lock; the timer alone re-grades by time."""

    def __init__(self, settings, store, clock, producer) -> None:
        self.settings, self.store, self.clock, self.producer = settings, store, clock, producer

    async def grade(self, records: list[Record]) -> None:
        from rules import risk
        from streams.faustext.outbox import publish

        result = process_batch(records, RS, self.store, utcnow())  # no clock: no catch-up
        names = self.settings.topics
        await publish(self.producer, {names.grade_changes: result.grade_changes, names.alerts: result.alerts})
        reached: dict[int, float] = {}
        for r in records:
            ts = orjson.loads(r.value or b"{}")["occurred_at"]
            reached[r.partition] = max(reached.get(r.partition, 0.0), datetime.fromisoformat(ts).timestamp())
        self.store.write_many(None, [(cid.encode(), raw, rec.partition) for cid, (raw, rec) in result.states.items()])
        self.clock.advanced(reached)
        looks = {}
        for cid, (raw, _rec) in result.states.items():
            state = CustomerState.from_bytes(raw)
            looks[cid] = (state.last_event_ts, risk.first_look(RS, state, timedelta(0)))
        self.clock.note(looks, result.states)


def race(seed: int, writer, as_it_was: bool = False) -> tuple[list[Record], list[bytes], list[bytes]]:
    """The batch handler and the clock's timer running concurrently in one event loop, the
    producer's acknowledgements taking a random number of turns."""
    rng = random.Random(3000 + seed)
    records = history(seed, customers=30, events=600)
    store = Store()
    published: list[bytes] = []
    alerts: list[bytes] = []
    settings = Settings(clock="event", partitions=PARTITIONS, app_id="t", at_risk_horizon_days=0)
    log: list = []
    producer = SlowAcks(log, rng)
    tps = [SimpleNamespace(topic=settings.topics.transactions, partition=p) for p in range(PARTITIONS)]
    app = SimpleNamespace(producer=producer, gradeflow_population=None,
                          assignor=SimpleNamespace(assigned_actives=lambda: tps))

    async def run() -> None:
        clock = Clock(app, settings, RS, store, store, writer)
        grader: Any = (HandlerAsItWas(settings, store, clock, producer) if as_it_was
                       else BatchGrader(settings, RS, store, clock, None, writer, lambda: producer))
        await clock.rebuild()
        done = asyncio.Event()

        async def timer() -> None:
            while not done.is_set():
                await clock.tick()
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)

        ticking = asyncio.ensure_future(timer())
        i = 0
        while i < len(records):
            size = rng.choice([1, 4, 16])
            await grader.grade(records[i:i + size])
            i += size
        done.set()
        await ticking
        await clock.tick()

    asyncio.run(run())
    names = settings.topics
    for entry in log:
        if entry[0] == "send" and entry[1] == names.grade_changes:
            published.append(entry[3])
        elif entry[0] == "send" and entry[1] == names.alerts:
            alerts.append(entry[3])
    return records, published, alerts


@pytest.mark.parametrize("seed", range(10))
def test_the_handler_and_the_timer_never_interleave_on_a_customer(seed: int) -> None:
    records, published, alerts = race(seed, asyncio.Lock())
    report = Audit(RS, clock="event").check(records, published, alerts)
    assert report.ok, report.render()
    assert len([v for v in published if orjson.loads(v)["cause"]["kind"] == "clock"]) > 10


def test_the_race_as_it_was_breaks_chains() -> None:
    """What ordering the clock with the handler prevents, shown: with neither the writer lock nor
    the handler's catch-up (the worker as it was), the same runs publish broken chains and changes
    that differ from the offline run."""
    problems: dict[str, int] = {}
    for seed in range(10):
        records, published, alerts = race(seed, NoLock(), as_it_was=True)
        for kind, found in Audit(RS, clock="event").check(records, published, alerts).problems.items():
            problems[kind] = problems.get(kind, 0) + len(found)
    assert problems.get("broken chains", 0) > 0 and problems.get("customers differing from offline", 0) > 0
