"""Shared parts of the fault-injection suite: a fixed history, its offline grading, a paced
producer, reading the outputs back and the workers' /metrics.

The history is deterministic (seeded): a few thousand transactions of a few hundred customers,
each customer's mostly in event-time order, with refunds, late events (inside the window: applied;
beyond the allowed lateness: dead letters ``late``) and duplicates (an earlier record of the customer
re-sent, byte for byte, at a later offset). Only the ``transactions`` topic is used, so that each
customer's events have one order, the same on the broker and offline.
"""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.tools.local import kafka_options
from streams.processor import TRANSACTIONS, Record, process_batch

CUSTOMERS = 300
EVENTS = 3000
TZ = timezone(timedelta(hours=8))
NOW = datetime.now(timezone.utc)


def history(seed: int = 5) -> list[tuple[bytes, bytes]]:
    """EVENTS (key, value) records, including ~4% duplicates, ~6% late inside the window, ~1% too late."""
    rng = random.Random(seed)
    names = [f"cust-{i:03d}" for i in range(CUSTOMERS)]
    clock = {c: datetime(2023, 1, 1, 9, tzinfo=TZ) + timedelta(days=rng.randrange(60)) for c in names}
    sent: dict[str, list[tuple[bytes, bytes]]] = {c: [] for c in names}
    out: list[tuple[bytes, bytes]] = []
    n = 0
    while len(out) < EVENTS:
        customer = rng.choice(names)
        roll = rng.random()
        if roll < 0.04 and sent[customer]:
            out.append(rng.choice(sent[customer]))  # a duplicate: the same bytes again, later
            continue
        if roll < 0.10:
            when = clock[customer] - timedelta(days=rng.choice([1, 4, 30, 200]), minutes=rng.randrange(600))
        elif roll < 0.11:
            when = clock[customer] - timedelta(days=400)  # beyond the 365-day lateness
        else:
            clock[customer] += timedelta(days=rng.choice([0, 1, 2, 5, 20, 45, 90, 150]), minutes=rng.randrange(600))
            when = clock[customer]
        refund = rng.random() < 0.12
        amount = f"{rng.choice([80, 500, 2500, 9000, 30000]) * (0.5 if refund else 1):.2f}"
        doc = {"event_id": f"e{n}", "customer_id": customer, "occurred_at": when.isoformat(),
               "type": "refund" if refund else "purchase", "amount": amount, "currency": "CNY"}
        n += 1
        record = (customer.encode(), orjson.dumps(doc))
        sent[customer].append(record)
        out.append(record)
    return out


def summary(doc: dict[str, Any]) -> tuple:
    """What must be equal between runs: everything but emitted_at."""
    return (doc["event_id"], doc["ladder"], doc["previous_grade"], doc["grade"], doc["direction"],
            doc["cause"]["event_id"], doc["as_of"], doc["metrics"]["code"], doc["metrics"]["monetary"])


class Offline:
    """The history through process_batch (the worker's code) over a dict store, one record per batch.

    ``changes``: per customer, ``summarize(change)`` of each grade change in order; ``dead``: the
    dead letters in order; ``late``: the event ids dead-lettered as late.
    """

    def __init__(self, records: list[tuple[bytes | None, bytes | None]],
                 summarize: Callable[[dict[str, Any]], tuple] | None = None) -> None:
        rs = compile_ruleset(load("rfm-5"))
        summarize = summarize or summary
        store: dict[str, bytes] = {}
        self.changes: dict[str, list[tuple]] = {}
        self.dead: list[dict[str, Any]] = []
        self.late: set[str] = set()
        self.totals = {"applied": 0, "duplicates": 0, "replayed": 0, "dead": 0}
        for offset, (key, value) in enumerate(records):
            result = process_batch([Record(TRANSACTIONS, "t", 0, offset, key, value)], rs, store, NOW)
            assert result.reconciled
            for name in self.totals:
                self.totals[name] += getattr(result, name)
            for customer, (raw, _record) in result.states.items():
                store[customer] = raw
            for _key, doc in result.grade_changes:
                change = orjson.loads(doc)
                self.changes.setdefault(change["customer_id"], []).append(summarize(change))
            for _dead_key, doc in result.dead_letters:
                dead = orjson.loads(doc)
                self.dead.append(dead)
                if dead["reason"] == "late":
                    self.late.add(orjson.loads(dead["value"])["event_id"])
        self.final = final_grades(self.changes)


def final_grades(changes: dict[str, list[tuple]]) -> dict[tuple[str, str], str]:
    """(customer, ladder) → the grade of its last change."""
    return {(customer, s[1]): s[3] for customer, seq in changes.items() for s in seq}


class PacedProducer(threading.Thread):
    """Produces the records in order, ``per_flush`` at a time with a pause, so the stream lasts a while.

    ``progress`` is the number of records flushed so far; faults are injected when it passes marks.
    """

    def __init__(self, bootstrap: str, env: dict[str, str], records: list[tuple[bytes, bytes]],
                 per_flush: int = 50, pause_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.env, self.records = bootstrap, env, records
        self.per_flush, self.pause_s = per_flush, pause_s
        self.progress = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            p = KafkaProducer(**kafka_options(self.bootstrap, self.env), acks="all", enable_idempotence=True,
                              max_in_flight_requests_per_connection=1, retries=1000, linger_ms=5,
                              request_timeout_ms=10000, retry_backoff_ms=250, delivery_timeout_ms=180000,
                              reconnect_backoff_max_ms=2000)
            topic = self.env["GRADEFLOW_TOPIC_TRANSACTIONS"]
            for i, (key, value) in enumerate(self.records):
                p.send(topic, key=key, value=value)
                if i % self.per_flush == self.per_flush - 1:
                    p.flush()
                    self.progress = i + 1
                    time.sleep(self.pause_s)
            p.flush()
            p.close()
            self.progress = len(self.records)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_for(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.progress < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"producer stuck at {self.progress} of {count}"
            time.sleep(0.1)


def read_all(bootstrap: str, topics: list[str], env: dict[str, str], idle_s: float = 3.0,
             timeout_s: float = 90.0) -> list[tuple[str, bytes]]:
    """(topic, value) of every record on ``topics``, from the beginning until ``idle_s`` without one.

    Not streams.tools.local.consume: kafka-python refuses network frames over
    ``receive_message_max_bytes`` (1 MB by default) while a fetch may return up to
    ``fetch_max_bytes`` (50 MB), so reading a few MB of outputs fails there.
    """
    consumer = KafkaConsumer(*topics, **kafka_options(bootstrap, env), auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, receive_message_max_bytes=64 * 1024 * 1024,
                             fetch_max_bytes=16 * 1024 * 1024)
    out: list[tuple[str, bytes]] = []
    started = last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s and time.monotonic() - started < timeout_s:
            batch = consumer.poll(timeout_ms=200)
            if batch:
                last = time.monotonic()
                for records in batch.values():
                    out.extend((r.topic, r.value) for r in records)
    finally:
        consumer.close()
    return out


class Outputs:
    """Grade changes and dead letters read back from the broker."""

    def __init__(self, bootstrap: str, env: dict[str, str]) -> None:
        changes: dict[str, list[tuple]] = {}
        copies: dict[str, set[tuple]] = {}
        late: set[str] = set()
        topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_DEAD_LETTERS"]]
        for topic, value in read_all(bootstrap, topics, env):
            doc = orjson.loads(value)
            if topic == topics[1]:
                assert doc["reason"] == "late", doc
                late.add(orjson.loads(doc["value"])["event_id"])
                continue
            s = summary(doc)
            if s[0] not in copies:
                changes.setdefault(doc["customer_id"], []).append(s)
            copies.setdefault(s[0], set()).add(s)
        self.changes = changes  # per customer, in topic order, each event_id once (its first copy)
        self.late = late
        self.redelivered = sum(1 for c in copies.values() if len(c) > 1)
        # A change delivered twice is the same change: same event_id, same content.
        self.inconsistent = {eid: c for eid, c in copies.items() if len(c) > 1}
        self.final = final_grades(changes)


def wait_for_outputs(bootstrap: str, env: dict[str, str], expected: Offline, timeout_s: float = 150.0,
                     describe: Callable[[], str] = lambda: "") -> Outputs:
    """Read the outputs until they equal the offline run (or time runs out); assert they do."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = Outputs(bootstrap, env)
        if (got.changes == expected.changes and got.late == expected.late) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not got.inconsistent, f"a change re-delivered with other content: {list(got.inconsistent.items())[:2]}"
    differ = sorted(c for c in set(expected.changes) | set(got.changes)
                    if got.changes.get(c) != expected.changes.get(c))
    lost = sum(len([x for x in expected.changes.get(c, []) if x not in got.changes.get(c, [])]) for c in differ)
    extra = sum(len([x for x in got.changes.get(c, []) if x not in expected.changes.get(c, [])]) for c in differ)
    examples = "\n".join(f"  {c}: offline {expected.changes.get(c)}\n  {' ' * len(c)}  online  {got.changes.get(c)}"
                         for c in differ[:2])
    assert not differ, (f"{len(differ)} of {len(expected.changes)} customers differ: {lost} changes lost, "
                        f"{extra} unexpected\n{examples}\n{describe()}")
    assert got.late == expected.late
    assert got.final == expected.final
    return got


COUNTERS = ("consumed", "applied", "duplicate", "replayed", "dead_lettered")


def scrape(port: int) -> dict[str, float]:
    """The worker's event counters and ``unreconciled`` from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {name: 0.0 for name in COUNTERS}
    for name in COUNTERS:
        for value in re.findall(rf"^gradeflow_events_{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M):
            out[name] += float(value)
    found = re.findall(r"^gradeflow_events_unreconciled (\S+)$", text, re.M)
    assert found, "no gradeflow_events_unreconciled on /metrics"
    out["unreconciled"] = float(found[0])
    return out
