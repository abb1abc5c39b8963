"""Erasure without a broker: refusal on the hot path (streams/processor.py), the settings, and the
removal of a customer's Redis keys against the real Redis (streams/erasure.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from rules.erasure import Erasures
from schemas.errors import ConfigurationError
from streams.console.feed import Feed as ConsoleFeed
from streams.downstream.history import AsyncHistory, Bounds
from streams.downstream.redis_grades import AsyncGrades, counts_key, customer_key
from streams.erasure import erase_redis, glob_escape
from streams.processor import process_batch
from streams.settings import load_settings
from tests.streams.downstream_helpers import delete_prefix
from tests.streams.test_processor import NOW, RS, DictStore, Feed, changes_of

REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET = b"s" * 32


def test_an_erased_customers_older_events_are_refused_counted_and_leave_nothing() -> None:
    feed = Feed()
    feed.txn("alice", "2026-01-10T10:00:00+08:00", "9000.00")
    feed.txn("bob", "2026-01-10T11:00:00+08:00", "9000.00")
    feed.txn("alice", "2026-02-10T10:00:00+08:00", "500.00")
    erasures = Erasures(SECRET)
    erasures.erase("alice", datetime.fromisoformat("2026-03-01T00:00:00+08:00").timestamp())
    store = DictStore()
    result = process_batch(feed.records, RS, store, NOW, erased=erasures)
    assert (result.consumed, result.applied, result.refused, result.dead) == (3, 1, 2, 0)
    assert result.reconciled
    assert set(result.states) == {"bob"}  # no state, no offsets: nothing of alice
    assert {c["customer_id"] for c in changes_of(result)} == {"bob"}
    assert not result.dead_letters  # a dead letter would copy the erased data


def test_events_after_the_erasure_start_a_new_customer() -> None:
    erased_at = datetime.fromisoformat("2026-03-01T00:00:00+08:00").timestamp()
    erasures = Erasures(SECRET)
    erasures.erase("alice", erased_at)
    feed = Feed()
    feed.txn("alice", "2026-01-10T10:00:00+08:00", "9000.00")  # replayed from before: refused
    feed.txn("alice", "2026-03-02T10:00:00+08:00", "80.00")
    result = process_batch(feed.records, RS, DictStore(), NOW, erased=erasures)
    assert (result.applied, result.refused) == (1, 1)
    first = changes_of(result)[0]
    assert first["previous_grade"] is None and first["cause"]["event_id"] == "t1"


def test_without_erasures_the_batch_is_graded_as_before() -> None:
    feed = Feed()
    feed.txn("alice", "2026-01-10T10:00:00+08:00", "9000.00")
    plain = process_batch(feed.records, RS, DictStore(), NOW)
    with_none = process_batch(feed.records, RS, DictStore(), NOW, erased=Erasures(SECRET))
    assert plain.applied == with_none.applied == 1 and with_none.refused == 0
    assert [c["event_id"] for c in changes_of(plain)] == [c["event_id"] for c in changes_of(with_none)]


def test_the_erasure_key_is_secret_long_enough_and_markers_outlive_the_inputs(clean_env: pytest.MonkeyPatch) -> None:
    key = "x" * 40
    settings = load_settings(erasure_key=key)
    assert key not in repr(settings) and key not in str(settings.erasure_key)
    with pytest.raises(ConfigurationError) as short:
        load_settings(erasure_key="too-short")
    assert "GRADEFLOW_ERASURE_KEY" in str(short.value) and "too-short" not in str(short.value)
    with pytest.raises(ConfigurationError, match="GRADEFLOW_ERASURE_MARKERS_RETENTION_MS"):
        load_settings(erasure_key=key, erasure_markers_retention_ms=1000, input_retention_ms=2000)
    assert load_settings(erasure_key=key, erasure_markers_retention_ms=3000,
                         input_retention_ms=2000).erasure_markers_retention_ms == 3000


def test_erasure_topics_are_declared_only_with_a_key(clean_env: pytest.MonkeyPatch) -> None:
    from streams.topics import topic_specs

    plain = {s.name for s in topic_specs(load_settings())}
    specs = {s.name: s for s in topic_specs(load_settings(erasure_key="x" * 40, partitions=6))}
    assert set(specs) - plain == {"customer-erasures", "erasure-markers", "erasure-receipts"}
    assert specs["customer-erasures"].partitions == 6  # co-partitioned with the inputs
    assert specs["erasure-markers"].cleanup_policy == "compact"
    assert specs["erasure-receipts"].cleanup_policy == "delete"


def test_glob_escape_makes_ids_literal() -> None:
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix no other test uses; its keys are deleted afterwards (tests/conftest.py marks users broker)."""
    name = f"test-erasure-{uuid.uuid4().hex[:8]}"
    yield name
    delete_prefix(name, REDIS_URL)


def _change(customer: str, grade: str, as_of: str, event_id: str) -> dict:
    return {"customer_id": customer, "ladder": "value", "grade": grade, "previous_grade": None, "direction": "initial",
            "as_of": as_of, "event_id": event_id, "cause": {"kind": "transaction", "event_id": "t"}}


def _alert(customer: str, kind: str = "downgrade") -> dict:
    suffix = "at-risk" if kind == "at_risk" else "key-downgrade"
    return {"alert_id": f"a-{customer}-{kind}", "customer_id": customer, "ladder": "value", "severity": "critical",
            "summary": f"{customer} dropped", "previous_grade": "VIP", "grade": "regular",
            "as_of": "2026-01-02T00:00:00+00:00", "kind": kind, "due_at": "2030-01-01T00:00:00+00:00",
            "dedup_key": f"gradeflow/value/{customer}/{suffix}", "grade_change_event_id": "c"}


def test_erase_redis_removes_every_key_and_entry_of_the_customer_and_only_theirs(redis_prefix: str) -> None:
    p = redis_prefix
    # "a*" would match "alice" as a pattern: ids are literal.
    customers = ["alice", "a*", "bob"]

    async def fill() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            grades = AsyncGrades(client, p)
            await grades.apply([(_change(c, "VIP", "2026-01-01T00:00:00+00:00", f"e-{c}"), i)
                                for i, c in enumerate(customers)])
            await AsyncHistory(client, p, Bounds(100, 400.0)).record(
                [(_change(c, "VIP", "2026-01-01T00:00:00+00:00", f"e-{c}"), i) for i, c in enumerate(customers)])
            await ConsoleFeed(client, p).record([_change(c, "VIP", "2026-01-01T00:00:00+00:00", f"e-{c}")
                                                 for c in customers],
                                                [_alert(c, k) for c in customers for k in ("downgrade", "at_risk")], [])
            for c in customers:
                for kind in ("cooldown:webhook", "open:pagerduty"):
                    await client.set(f"{p}:alert:{kind}:gradeflow/value/{c}/key-downgrade", "x")
                await client.set(f"{p}:alert:recovered:gradeflow/value/{c}/key-downgrade", "1")
                await client.hset(f"{p}:alert:firing:alertmanager", f"gradeflow/value/{c}/key-downgrade", "{}")
        finally:
            await client.aclose()

    async def erase(customer: str) -> int:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await erase_redis(client, p, customer)
        finally:
            await client.aclose()

    asyncio.run(fill())
    sync: Any = redis.Redis.from_url(REDIS_URL)
    try:
        def mentions(customer: str) -> list[str]:
            """Every key, hash field and set member under the prefix that names ``customer``."""
            found = []
            for key in sync.scan_iter(match=f"{glob_escape(p)}:*"):
                name = key.decode()
                kind = sync.type(key).decode()
                parts = [name]
                if kind == "hash":
                    parts += [f"{f.decode()}={v.decode()}" for f, v in sync.hgetall(key).items()]
                elif kind == "zset":
                    parts += [m.decode() for m in sync.zrange(key, 0, -1)]
                found += [f"{name}: {part}" for part in parts
                          if f":{customer}" in part or f"/{customer}/" in part or f'"{customer}"' in part
                          or part.startswith(customer + "\x1f") or part.endswith(":" + customer)]
            return found

        assert mentions("alice") and mentions("a*") and mentions("bob")
        assert sync.hget(counts_key(p, "value"), "VIP") == b"3"
        removed = asyncio.run(erase("a*"))
        assert removed >= 9
        assert mentions("a*") == []
        assert mentions("alice") and mentions("bob")  # the pattern-like id took nobody else with it
        assert sync.hget(counts_key(p, "value"), "VIP") == b"2"
        assert asyncio.run(erase("alice")) > 0 and mentions("alice") == []
        assert sync.exists(customer_key(p, "bob")) and len(sync.zrange(f"{p}:console:alerts", 0, -1)) == 2
        assert asyncio.run(erase("alice")) == 0  # twice: harmless
        assert orjson.loads(sync.zrange(f"{p}:console:alerts", 0, -1)[0])["customer_id"] == "bob"
    finally:
        sync.close()


def test_downstream_agents_drop_an_erased_customers_outputs_graded_before_the_erasure(
        clean_env: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from streams.erasure import Erasure

    erasure = Erasure(None, load_settings(erasure_key="x" * 40), None, None, asyncio.Lock(), lambda: None)
    erasure.erasures.erase("alice", datetime.fromisoformat("2026-03-01T00:00:00+00:00").timestamp())

    def event(key: str, as_of: str) -> SimpleNamespace:
        doc = {"customer_id": key, "as_of": as_of, "ladder": "value", "grade": "VIP"}
        return SimpleNamespace(message=SimpleNamespace(key=key.encode(), value=orjson.dumps(doc)))

    before, after = event("alice", "2026-02-01T00:00:00+00:00"), event("alice", "2026-03-02T00:00:00+00:00")
    bob = event("bob", "2026-02-01T00:00:00+00:00")
    assert erasure.keep([before, bob, after]) == [bob, after]  # after the erasure: the new customer's
    assert erasure.erased({"customer_id": "alice", "as_of": "2026-03-01T00:00:00+00:00"})
    assert not erasure.erased({"customer_id": "bob", "as_of": "2026-01-01T00:00:00+00:00"})


def test_customers_erase_is_refused_while_erasure_is_off(clean_env: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from streams.tools.cli import main

    assert main(["customers", "erase", "alice"]) == 1
    assert "GRADEFLOW_ERASURE_KEY" in capsys.readouterr().err
