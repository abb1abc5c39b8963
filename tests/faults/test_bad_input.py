"""The whole bad-input catalogue on the real broker, between good events.

Every bad record lands on the dead-letter topic with its reason, every good one around them is
graded exactly as offline, the duplicate counts once, and the worker's counters reconcile:
consumed = applied + duplicate + replayed + dead_lettered. A 10 MB value cannot even be produced
with Kafka's defaults; the largest value the broker takes (under 1 MiB) is a ``too_large`` dead letter.
"""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError

from streams.tools.local import free_port, kafka_options, produce
from tests.faults.faulthelp import Offline, read_all, scrape, summary
from tests.streams.test_processor_input import CATALOGUE, txn_doc

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TEN_MB = 10 * 1024 * 1024


def catalogue_records() -> tuple[list[tuple[bytes | None, bytes | None]], list[str]]:
    """Good events of three customers with every catalogue entry (and a duplicate) between them."""
    records: list[tuple[bytes | None, bytes | None]] = []
    reasons = []
    day = 1
    for name, key, value, reason in CATALOGUE:
        if name == "too-large":  # 10 MB cannot be produced; the largest value the broker takes instead
            value = b'{"event_id": "' + b"x" * 900_000 + b'"}'
        for customer in ("amy", "bo", "cy"):
            amount = {"amy": "3000.00", "bo": "150.00", "cy": "9000.00"}[customer]
            doc = txn_doc(f"{customer}-{day}", customer, f"2026-05-{day:02d}T09:00:00+08:00", amount)
            records.append((customer.encode(), orjson.dumps(doc)))
        records.append((key, value))
        reasons.append(reason)
        day += 1
    records.append(records[0])  # a producer retry of amy's first purchase, at a later offset
    records.append((b"amy", orjson.dumps(txn_doc("amy-late", "amy", "2025-01-01T09:00:00+08:00"))))  # 485 days
    reasons.append("late")
    records.append((b"amy", orjson.dumps(txn_doc("amy-last", "amy", "2026-05-30T09:00:00+08:00", extra={"x": 1}))))
    return records, reasons


def test_the_whole_catalogue_between_good_events(worker_factory, bootstrap) -> None:
    port = free_port()
    worker = worker_factory(GRADEFLOW_WEB_PORT=str(port), GRADEFLOW_DOWNSTREAM="false")
    env = worker.env
    topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"]

    # 10 MB: the producer refuses it (max.request.size, 1 MiB) …
    p = KafkaProducer(**kafka_options(bootstrap, env))
    with pytest.raises(MessageSizeTooLargeError):
        p.send(topic, key=b"zed", value=b"x" * TEN_MB).get(timeout=10)  # refused before sending
    p.close()
    # … and with the producer's limit raised, the broker does (message.max.bytes, 1 MiB).
    big = KafkaProducer(**kafka_options(bootstrap, env), max_request_size=TEN_MB + 4096, acks="all")
    with pytest.raises(KafkaError) as refused:
        big.send(topic, key=b"zed", value=b"x" * TEN_MB).get(timeout=60)
    big.close()
    assert "TooLarge" in type(refused.value).__name__, refused.value

    records, reasons = catalogue_records()
    produce(bootstrap, topic, records, env=env)
    expected = Offline(records).changes
    assert sum(len(v) for v in expected.values()) >= 6

    changes: dict[str, list[tuple]] = {}
    dead: list[dict] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        changes, dead = {}, []
        for t, value in read_all(bootstrap, [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_DEAD_LETTERS"]],
                                 env, idle_s=2, timeout_s=30):
            doc = orjson.loads(value)
            if t == env["GRADEFLOW_TOPIC_DEAD_LETTERS"]:
                assert len(value) < 1_000_000
                dead.append(doc)
            else:
                changes.setdefault(doc["customer_id"], []).append(summary(doc))
        if len(dead) >= len(reasons) and changes == expected:
            break
        time.sleep(1)
    assert sorted(d["reason"] for d in dead) == sorted(reasons), worker.tail()
    assert changes == expected
    # The last good event, after everything, was graded: the worker kept going.
    by_offset = {d["source_offset"]: d for d in dead}
    too_large = [d for d in dead if d["reason"] == "too_large"]
    assert too_large and too_large[0]["value"].startswith('{"event_id": "xxx') and "truncated" in too_large[0]["error"]
    assert len(by_offset) == len(dead)  # one dead letter per bad record

    deadline = time.monotonic() + 30
    while True:
        counters = scrape(port)
        if counters["consumed"] >= len(records) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert counters == {"consumed": len(records), "applied": len(records) - len(reasons) - 1, "duplicate": 1,
                        "replayed": 0, "dead_lettered": len(reasons), "unreconciled": 0}
