"""End to end on the real broker: a worker grades a scripted history exactly."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import orjson

from streams.tools.local import ROOT, consume
from tests.streams.producerhelp import produce_librdkafka as produce


def txn(event_id: str, customer: str, at: str, amount: str, kind: str = "purchase") -> tuple[bytes, bytes]:
    doc = {"event_id": event_id, "customer_id": customer, "occurred_at": at, "type": kind,
           "amount": amount, "currency": "CNY", "channel": "store"}
    return customer.encode(), orjson.dumps(doc)


def history() -> list[tuple[bytes | None, bytes | None]]:
    """Three customers and three bad events, in the order produced."""
    records: list[tuple[bytes | None, bytes | None]] = []
    # carol: a big purchase that rolls out of the window exactly 365 days later.
    records.append(txn("c1", "carol", "2025-01-01T10:00:00+08:00", "60000"))
    records.append(txn("c2", "carol", "2025-12-31T10:00:00+08:00", "100"))
    # alice: twelve purchases of 5000 in twelve days.
    for day in range(1, 13):
        records.append(txn(f"a{day}", "alice", f"2026-01-{day:02d}T10:00:00+08:00", "5000.00"))
    records.append((b"alice", b'{"event_id": "x1", "customer_id": "alice", "occurred_at": '))  # malformed
    records.append(txn("c3", "carol", "2026-01-01T10:00:00+08:00", "100"))
    records.append(txn("x2", "alice", "2026-01-15T10:00:00+08:00", "-5"))  # not > 0
    records.append((b"bob", orjson.dumps({"event_id": "x3", "customer_id": "bob", "occurred_at": "2026-01-15T10:00:00",
                                           "type": "purchase", "amount": "1", "currency": "CNY"})))  # no offset
    records.append(txn("b1", "bob", "2026-01-16T09:00:00+08:00", "100"))
    records.append(txn("a-refund", "alice", "2026-01-20T10:00:00+08:00", "45000", kind="refund"))
    records.append(txn("a13", "alice", "2026-05-15T10:00:00+08:00", "0.01"))
    return records


# (customer, previous, grade, direction, cause event_id, R F M code, monetary), reasoned from rfm-5:
EXPECTED_CHANGES = {
    "carol": [
        (None, "A", "initial", "c1", "515", "60000.00"),        # R5 F1 M5 = 11
        # c2 on day +364: F=2, M=60100 → 5+2+5 = 12, still A: no event.
        ("A", "B", "downgrade", "c3", "521", "200.00"),          # day +365: c1 rolled off, 5+2+1 = 8
    ],
    "alice": [
        (None, "B", "initial", "a1", "513", "5000.00"),          # 5+1+3 = 9
        ("B", "A", "upgrade", "a2", "523", "10000.00"),          # 5+2+3 = 10
        ("A", "S", "upgrade", "a6", "544", "30000.00"),          # 5+4+4 = 13
        ("S", "A", "downgrade", "a-refund", "453", "15000.00"),  # 8 days, F=12, 60000-45000: 4+5+3 = 12
        # a13, 123 days after a12: R=5 again (it is a purchase), F=13 → 5, M=15000.01 → 3: 13 → S
        ("A", "S", "upgrade", "a13", "553", "15000.01"),
    ],
    "bob": [
        (None, "B", "initial", "b1", "511", "100.00"),           # 5+1+1 = 7
    ],
}
EXPECTED_ALERTS = [("carol", "A", "B", "critical"), ("alice", "S", "A", "warning")]
EXPECTED_DEAD = [("alice", "invalid_amount"), ("alice", "malformed_json"), ("bob", "invalid_timestamp")]


def test_worker_grades_a_scripted_history(worker_factory, bootstrap):
    worker = worker_factory()
    env = worker.env
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history())
    want = sum(len(v) for v in EXPECTED_CHANGES.values()) + len(EXPECTED_ALERTS) + len(EXPECTED_DEAD)
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"], env["GRADEFLOW_TOPIC_DEAD_LETTERS"]]
    got = list(consume(bootstrap, topics, until=want, idle_s=30, timeout_s=90))
    # and nothing more arrives
    extra = list(consume(bootstrap, topics, idle_s=3, timeout_s=10))
    assert len(extra) == len(got), (len(extra), worker.tail())

    changes = defaultdict(list)
    alerts = []
    dead = []
    for topic, key, value in got:
        doc = orjson.loads(value)
        if topic == topics[0]:
            assert key == doc["customer_id"].encode()
            m = doc["metrics"]
            changes[doc["customer_id"]].append((doc["previous_grade"], doc["grade"], doc["direction"],
                                                doc["cause"]["event_id"], m["code"], m["monetary"]))
            assert doc["ladder"] == "value" and doc["ruleset"] == {"id": "rfm-5", "version": "1"}
            assert doc["cause"]["kind"] == "transaction"
        elif topic == topics[1]:
            alerts.append((doc["customer_id"], doc["previous_grade"], doc["grade"], doc["severity"]))
            assert doc["dedup_key"] == f"gradeflow/value/{doc['customer_id']}/key-downgrade"
        else:
            dead.append(doc)
    assert dict(changes) == EXPECTED_CHANGES
    assert sorted(alerts) == sorted(EXPECTED_ALERTS)
    assert sorted((d["key"], d["reason"]) for d in dead) == EXPECTED_DEAD
    # Each dead letter points at its original record and carries its bytes.
    originals = {(p, o): v for p, o, v in read_with_positions(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"])}
    for d in dead:
        assert d["source_topic"] == env["GRADEFLOW_TOPIC_TRANSACTIONS"]
        assert d["value_encoding"] == "utf-8"
        assert originals[(d["source_partition"], d["source_offset"])] == d["value"].encode()
        assert d["error"]


def read_with_positions(bootstrap, topic):
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return [(r.partition, r.offset, r.value) for r in consumer]
    finally:
        consumer.close()


def test_worker_without_broker_says_so_and_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "streams.tools.cli", "worker", "--bootstrap", "127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "127.0.0.1:9" in lines[0] and "deploy/local/up" in lines[0]
