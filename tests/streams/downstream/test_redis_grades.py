"""Current grades in the real Redis: never backwards, counts exact, written by the worker, rebuilt from the topic."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import cast

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from tests.streams.downstream_helpers import delete_prefix, wait_until
from tests.streams.test_end_to_end import EXPECTED_CHANGES, history

from streams.tools.local import ROOT, consume, produce
from streams.downstream.history import history_key
from streams.downstream.redis_grades import APPLIED, DUPLICATE, STALE, AsyncGrades, apply_sync, customer_key

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix no other test uses; its keys are deleted afterwards (tests/conftest.py marks users broker)."""
    name = f"test-redis-{uuid.uuid4().hex[:8]}"
    yield name
    delete_prefix(name, REDIS_URL)


def change(customer: str, seq: int, grade: str, as_of: str, ladder: str = "value") -> dict:
    return {"customer_id": customer, "ladder": ladder, "grade": grade, "as_of": as_of,
            "event_id": f"{customer}-{ladder}-{seq}", "direction": "downgrade", "previous_grade": None,
            "metrics": {"code": str(seq)}}


def scripted_history() -> list[tuple[dict, int]]:
    """Changes of 5 customers on 2 ladders in topic order (offset = position); many share an ``as_of``."""
    rng = random.Random(7)
    out = []
    clock: dict[str, int] = defaultdict(int)
    for offset in range(400):
        customer = f"c{rng.randrange(5)}"
        # as_of never decreases per customer (the grading agent's guarantee); often it stays equal.
        clock[customer] += rng.choice([0, 0, 1, 3])
        day = clock[customer]
        as_of = f"2026-{1 + day // 28:02d}-{1 + day % 28:02d}T10:00:00+08:00"
        out.append((change(customer, offset, rng.choice("SABCD"), as_of, rng.choice(["value", "loyalty"])), offset))
    return out


def expected(history_: list[tuple[dict, int]]) -> dict[tuple[str, str], tuple[str, str]]:
    last = {}
    for doc, _offset in history_:
        last[(doc["customer_id"], doc["ladder"])] = (doc["grade"], doc["event_id"])
    return last


def redis_state(client: redis.Redis, prefix: str, customers, ladders) -> dict[tuple[str, str], tuple[str, str]]:
    out = {}
    for c in customers:
        for ladder in ladders:
            raw = client.hget(customer_key(prefix, c), ladder)
            if raw is not None:
                doc = orjson.loads(raw)
                out[(c, ladder)] = (doc["grade"], doc["event_id"])
    return out


def counts(client: redis.Redis, prefix: str, ladder: str) -> dict[str, int]:
    raw = cast(dict[bytes, bytes], client.hgetall(f"{prefix}:grades:{ladder}"))  # a client without decoding
    return {k.decode(): int(v) for k, v in raw.items() if int(v)}


def test_out_of_order_and_repeated_writes_never_go_backwards(redis_prefix):
    hist = scripted_history()
    want = expected(hist)
    client = redis.Redis.from_url(REDIS_URL)
    rng = random.Random(11)
    try:
        for round_ in range(5):
            shuffled = hist + rng.sample(hist, 150)  # every change, some twice
            rng.shuffle(shuffled)
            for i in range(0, len(shuffled), 37):
                apply_sync(client, redis_prefix, shuffled[i:i + 37])
            state = redis_state(client, redis_prefix, {c for c, _ in want}, {lad for _, lad in want})
            assert state == want, f"round {round_}"
            for ladder in ("value", "loyalty"):
                truth = Counter(grade for (c, lad), (grade, _) in want.items() if lad == ladder)
                assert counts(client, redis_prefix, ladder) == dict(truth)
        # Replaying the whole topic again changes nothing and reports duplicates/stale only.
        results = apply_sync(client, redis_prefix, hist)
        assert APPLIED not in results and set(results) <= {DUPLICATE, STALE}
    finally:
        client.close()


def test_concurrent_writers_agree(redis_prefix):
    """Two clients (two workers during a rebalance) writing interleaved batches end at the last change."""
    hist = scripted_history()
    want = expected(hist)

    async def writer(seed: int) -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        grades = AsyncGrades(client, redis_prefix)
        items = list(hist)
        random.Random(seed).shuffle(items)
        for i in range(0, len(items), 25):
            await grades.apply(items[i:i + 25])
            await asyncio.sleep(0)
        await client.aclose()

    async def main() -> None:
        await asyncio.gather(writer(1), writer(2), writer(3))

    asyncio.run(main())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert redis_state(client, redis_prefix, {c for c, _ in want}, {"value", "loyalty"}) == want
        truth = Counter(grade for (c, lad), (grade, _) in want.items() if lad == "value")
        assert counts(client, redis_prefix, "value") == dict(truth)
    finally:
        client.close()


def test_equal_as_of_is_ordered_by_topic_offset(redis_prefix):
    """A late refund is graded as of the customer's latest event: same as_of, later offset wins."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        first = change("late", 1, "A", "2026-01-10T10:00:00+08:00")
        second = change("late", 2, "B", "2026-01-10T10:00:00+08:00")
        assert apply_sync(client, redis_prefix, [(second, 20), (first, 10)]) == [APPLIED, STALE]
        assert orjson.loads(client.hget(customer_key(redis_prefix, "late"), "value"))["grade"] == "B"
        assert counts(client, redis_prefix, "value") == {"B": 1}
    finally:
        client.close()


def test_worker_writes_current_grades_and_rebuild_restores_them(worker_factory, bootstrap):
    worker = worker_factory()
    env = worker.env
    prefix = env["GRADEFLOW_APP_ID"]  # the default prefix is the app id
    client = redis.Redis.from_url(REDIS_URL)
    try:
        produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history())
        final = {c: changes[-1][1] for c, changes in EXPECTED_CHANGES.items()}

        def grades_now():
            got = {}
            for c in final:
                raw = client.hget(customer_key(prefix, c), "value")
                if raw is not None:
                    got[c] = orjson.loads(raw)["grade"]
            return got == final and got

        wait_until(grades_now, timeout=90, what=f"Redis grades {final}; worker log:\n{worker.tail()}")
        assert counts(client, prefix, "value") == dict(Counter(final.values()))
        # Each customer's Redis doc is the last change on the topic for them, metrics included.
        last = {}
        for _, _key, value in consume(bootstrap, [env["GRADEFLOW_TOPIC_GRADE_CHANGES"]], idle_s=3, timeout_s=30):
            doc = orjson.loads(value)
            last[doc["customer_id"]] = doc
        for c, doc in last.items():
            stored = orjson.loads(client.hget(customer_key(prefix, c), "value"))
            assert (stored["grade"], stored["event_id"], stored["metrics"], stored["as_of"]) == \
                   (doc["grade"], doc["event_id"], doc["metrics"], doc["as_of"])
        before = {c: client.hgetall(customer_key(prefix, c)) for c in final}
        histories = {c: client.zrange(history_key(prefix, c, "value"), 0, -1, withscores=True) for c in final}
        assert {c: len(h) for c, h in histories.items()} == {c: len(v) for c, v in EXPECTED_CHANGES.items()}

        # Redis lost: rebuild from the topic.
        worker.stop()
        for key in client.scan_iter(match=f"{prefix}:*"):
            if not key.startswith(f"{prefix}:alert:".encode()):
                client.delete(key)
        run_env = {**os.environ, **env, "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap}
        proc = subprocess.run([sys.executable, "-m", "streams.tools.cli", "redis", "rebuild"], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "applied=" in proc.stdout
        after = {c: client.hgetall(customer_key(prefix, c)) for c in final}
        assert after == before
        # The histories come back too (this topic is not compacted yet), at the same offsets.
        assert {c: client.zrange(history_key(prefix, c, "value"), 0, -1, withscores=True) for c in final} == histories
        assert counts(client, prefix, "value") == dict(Counter(final.values()))
        # A second rebuild on top changes nothing.
        proc = subprocess.run([sys.executable, "-m", "streams.tools.cli", "redis", "rebuild"], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and " applied=0 " in proc.stdout, proc.stdout + proc.stderr
        assert {c: client.hgetall(customer_key(prefix, c)) for c in final} == before
        assert {c: client.zrange(history_key(prefix, c, "value"), 0, -1, withscores=True) for c in final} == histories

        # A compacted grade-changes topic may have lost a ladder's last change (it is keyed by customer
        # only): the tables still know the grade. From the tables alone, every grade comes back...
        from kafka import KafkaConsumer

        from streams.kafka_config import kafka_python_options
        from streams.downstream.redis_grades import fill_from_tables
        from streams.settings import load_settings

        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in run_env.items()
                                    if k.startswith("GRADEFLOW_") and k != "GRADEFLOW_WEB_PORT"})
        consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
        try:
            assert fill_from_tables(settings, client, consumer) == len(final)
            assert fill_from_tables(settings, client, consumer) == 0  # only where Redis has nothing
        finally:
            consumer.close()
        filled = {c: orjson.loads(client.hget(customer_key(prefix, c), "value")) for c in final}
        assert {c: d["grade"] for c, d in filled.items()} == final
        assert all(d["from"] == "table" and d["event_id"] is None for d in filled.values())
        assert counts(client, prefix, "value") == dict(Counter(final.values()))
        # ... and the real changes then take their place (same as_of, a real offset beats -1).
        proc = subprocess.run([sys.executable, "-m", "streams.tools.cli", "redis", "rebuild"], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert {c: client.hgetall(customer_key(prefix, c)) for c in final} == before
        assert counts(client, prefix, "value") == dict(Counter(final.values()))
    finally:
        client.close()
        delete_prefix(prefix, REDIS_URL)
