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
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.tools.audit import Audit
from streams.clock import Clock
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
    """The handler and the clock of one worker process over a shared table."""

    def __init__(self, store: Store, published: list, alerts: list) -> None:
        settings = Settings(clock="event", partitions=PARTITIONS, app_id="t", at_risk_horizon_days=0)
        self.settings, self.store, self.published, self.alerts = settings, store, published, alerts
        self.log: list = []
        tps = [SimpleNamespace(topic=settings.topics.transactions, partition=p) for p in range(PARTITIONS)]
        app = SimpleNamespace(producer=RecordingProducer(self.log, PARTITIONS), gradeflow_population=None,
                              assignor=SimpleNamespace(assigned_actives=lambda: tps))
        self.clock = Clock(app, settings, RS, store, store)
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
        """What streams/app.py's handler does; ``crash``: the process dies once the outputs are
        published, before the states are written."""
        clock = self.clock
        result = process_batch(records, RS, self.store, utcnow(), clock_horizon=clock.look_horizon,
                               stream_time=clock.stream_times({r.partition for r in records}))
        self.published += [doc for _, doc in result.grade_changes]
        self.alerts += [doc for _, doc in result.alerts]
        if crash:
            return
        for customer_id, (raw, record) in result.states.items():
            self.store.held[customer_id.encode()] = (record.partition, raw)
        for key, raw, partition in clock.advanced(result.stream_time):
            self.store.held[key] = (partition, raw)
        clock.note(result.looks, result.states)

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
