"""Erasure on a real broker and Redis: two workers, erasures requested mid-stream, a worker restarted
meanwhile, old events of the erased customers replayed after the restart and again to a worker
started after both stopped (it knows the erasures from the markers alone).

Afterwards every topic and Redis is read. The erased customers are left only where docs/erasure.md
says: the receipts, the refusal markers (keyed hashes, no id), the request topic and the input
topics (the producers' records, until their retention ends). On the compacted topics (the
changelog, grade-changes) the latest record of each erased customer is a tombstone with nothing
after it, so compaction leaves nothing of them; Redis holds no key, field or member naming them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
import redis

from rules.erasure import marker_key
from streams.readback import read_to_end
from streams.settings import erasure_topics, load_settings
from streams.tools.erase import request_erasures, wait_receipts
from streams.tools.local import ROOT, free_port, produce, unique_env
from streams.tools.replay import wait_graded
from tests.streams.downstream_helpers import delete_prefix, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

KEY = "erasure-test-key-" + "0123456789abcdef" * 2
CUSTOMERS = [f"cust-{i:02d}" for i in range(30)]
ERASED = ["cust-03", "cust-17"]
REDIS_URL = "redis://127.0.0.1:6379/0"


def events(customers: list[str], start: datetime, n: int, seed: int, tag: str) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    when = {c: start for c in customers}
    out = []
    for i in range(n):
        c = rng.choice(customers)
        when[c] += timedelta(days=rng.choice([0, 1, 3, 10]), minutes=rng.randrange(600))
        doc = {"event_id": f"{tag}{i}", "customer_id": c, "occurred_at": when[c].isoformat(), "type": "purchase",
               "amount": f"{rng.choice([80, 500, 2500, 9000, 30000]):.2f}", "currency": "CNY"}
        out.append((c.encode(), orjson.dumps(doc)))
    return out


def read_all(settings: Any, topic: str) -> list[Any]:
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka_config import kafka_python_options

    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        out = []
        for _tp, records in read_to_end(consumer, [TopicPartition(topic, p) for p in parts]):
            out += records
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def names(record: Any, customer: str) -> bool:
    text = (record.key or b"") + b"|" + (record.value or b"")
    return customer.encode() in text


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_erased_customers_leave_only_the_receipt_and_the_marker(worker_factory: Any) -> None:
    env = unique_env("erase", GRADEFLOW_ERASURE_KEY=KEY, GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10",
                     GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    env["GRADEFLOW_REDIS_PREFIX"] = env["GRADEFLOW_APP_ID"]
    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()})
    bootstrap = settings.kafka_bootstrap
    topics = settings.topics
    ports = [free_port(), free_port()]
    try:
        w1 = worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(ports[0])}, name="worker1")
        w2 = worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(ports[1])}, name="worker2")
        start = datetime(2026, 1, 5, 9, 0, tzinfo=timezone(timedelta(hours=8)))
        first = events(CUSTOMERS, start, 600, 1, "a")
        produce(bootstrap, topics.transactions, first)
        assert wait_graded(settings, 90, progress=False)
        client: Any = redis.Redis.from_url(REDIS_URL)
        prefix = env["GRADEFLOW_REDIS_PREFIX"]
        wait_until(lambda: all(client.exists(f"{prefix}:customer:{c}") for c in ERASED), 60,
                   what="the erased customers' grades in Redis")

        # Mid-stream: more events (the erased customers' among them, dated before the erasure)
        # while the erasures are requested and a worker restarts.
        second = events(CUSTOMERS, start + timedelta(days=200), 400, 2, "b")
        feeder = threading.Thread(target=produce, args=(bootstrap, topics.transactions, second))
        feeder.start()
        ids, receipts_from = request_erasures(settings, ERASED)
        w1.stop()
        feeder.join()
        w1 = worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(ports[0])}, name="worker1-again")
        receipts = wait_receipts(settings, set(ids), receipts_from, 120)
        assert set(receipts) == set(ids)
        assert {r["customer_id"] for r in receipts.values()} == set(ERASED)
        assert all(r["removed"]["output_tombstones"] == [topics.grade_changes] for r in receipts.values())
        # A visit re-done after the restart may repeat a receipt (same erasure id) that finds nothing
        # left; one of them removed the state.
        everything = [orjson.loads(r.value) for r in read_all(settings, erasure_topics(settings).receipts)]
        for erasure_id in ids:
            copies = [r for r in everything if r["erasure_id"] == erasure_id]
            assert any(r["removed"]["state_partition"] is not None for r in copies), copies

        # A replay of their old events after the restart: refused (the restarted worker read the markers).
        replay = [(k, v) for k, v in first if k.decode() in ERASED]
        produce(bootstrap, topics.transactions, replay)
        assert wait_graded(settings, 90, progress=False)
        refused = wait_until(lambda: sum(metric(p, "gradeflow_events_refused_total") for p in ports) >= len(replay),
                             60, what="the replayed events refused")
        assert refused
        assert sum(metric(p, "gradeflow_events_unreconciled") for p in ports) == 0

        # The CLI: an id never seen, and an erased one again; both harmless, each with a receipt.
        cli = subprocess.run([sys.executable, "-m", "streams.tools.cli", "customers", "erase", "nobody", ERASED[0],
                              "--wait", "--timeout", "90"], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "no state held" in cli.stdout and cli.stdout.count(" done: ") == 2

        # Both workers gone, a new one knows the erasures from the markers alone: the replay is refused.
        w1.stop()
        w2.stop()
        port = free_port()
        worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(port)}, name="worker3")
        produce(bootstrap, topics.transactions, replay)
        assert wait_graded(settings, 90, progress=False)
        assert wait_until(lambda: metric(port, "gradeflow_events_refused_total") >= len(replay), 60,
                          what="the replay refused by a worker that only read the markers")

        # Every topic of the run, record by record.
        erasures = erasure_topics(settings)
        markers = read_all(settings, erasures.markers)
        assert {r.key for r in markers} == {marker_key(KEY.encode(), c) for c in [*ERASED, "nobody"]}
        changelog = settings.changelog_topic("customer-state")
        for topic in (changelog, topics.grade_changes):
            records = read_all(settings, topic)
            for customer in ERASED:
                mine = [r for r in records if r.key == customer.encode()]
                assert mine, f"{customer} never on {topic}"
                assert mine[-1].value is None, f"{topic}: the latest record of {customer} is not a tombstone"
            assert not [r for r in records if r.value is not None and b"nobody" in r.value]
        for topic in (topics.dead_letters, erasures.markers):
            assert not [r for r in read_all(settings, topic) if any(names(r, c) for c in ERASED)], topic

        # Redis: nothing names them; the other customers are still there.
        leftovers = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            parts = [key]
            kind = client.type(key)
            if kind == b"hash":
                parts += [f + b"=" + v for f, v in client.hgetall(key).items()]
            elif kind == b"zset":
                parts += client.zrange(key, 0, -1)
            elif kind == b"string":
                parts.append(client.get(key) or b"")
            leftovers += [part for part in parts for c in ERASED
                          if c.encode() in part]
        assert leftovers == []
        assert sum(1 for c in CUSTOMERS if client.exists(f"{prefix}:customer:{c}")) == len(CUSTOMERS) - len(ERASED)
        client.close()
    finally:
        delete_prefix(env["GRADEFLOW_REDIS_PREFIX"], REDIS_URL)
