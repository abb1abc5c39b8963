"""The console's Redis feed (bounded, idempotent where it says so) on the real Redis, and its pure parts."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta, timezone

import pytest

from tests.streams.downstream_helpers import delete_prefix
from streams.console import assets
from streams.console.api import keep_sentence
from streams.console.feed import ALERTS_CAP, TIMELINE_CAP, Feed
from streams.downstream.history import AsyncHistory, Bounds

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TZ = timezone(timedelta(hours=8))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    name = f"test-console-{uuid.uuid4().hex[:8]}"
    yield name
    delete_prefix(name, REDIS_URL)


def change(cid: str, n: int, prev: str | None, grade: str, kind: str = "transaction") -> dict:
    return {"customer_id": cid, "ladder": "value", "previous_grade": prev, "grade": grade,
            "direction": "initial" if prev is None else "downgrade", "as_of": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}+08:00",
            "event_id": f"e{n}", "cause": {"kind": kind, "event_id": f"t{n}"}, "reasons": [], "metrics": None,
            "emitted_at": f"2026-12-01T00:00:{n % 60:02d}+00:00"}


def warning(cid: str, n: int, due: str) -> dict:
    return {"alert_id": f"w{n}", "customer_id": cid, "ladder": "value", "severity": "info", "kind": "at_risk",
            "summary": "... Then: Last purchase 91 days ago (> 90 days): R=3.", "previous_grade": "A", "grade": "B",
            "as_of": f"2026-01-01T00:00:{n:02d}+08:00", "due_at": due, "grade_change_event_id": "x"}


def test_feed_is_bounded_idempotent_and_ordered(redis_prefix):
    import redis.asyncio as aioredis

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        feed = Feed(client, redis_prefix)
        try:
            # The timeline is the customer's history (written by the redis-writer), over all its ladders.
            many = [change("big", n, "A", "B") for n in range(TIMELINE_CAP + 5)]
            writer = AsyncHistory(client, redis_prefix, Bounds(max_changes=TIMELINE_CAP + 100, max_age_days=400))
            other = [{**change("big", n, "A", "B"), "ladder": "loyalty", "event_id": f"l{n}"} for n in (3, 22)]
            await writer.record([(doc, 2 * n) for n, doc in enumerate(many)] + [(other[0], 7), (other[1], 45)])
            await feed.record(many, [], [], arrived=1_800_000_000)
            await feed.record(many, [], [], arrived=1_800_000_000)  # read again after a crash
            kept = await feed.timeline("big")
            order = [f"e{n}" for n in reversed(range(TIMELINE_CAP + 5))]
            order.insert(order.index("e22"), "l22")  # same as_of, later on the topic
            assert [c["event_id"] for c in kept] == order[:TIMELINE_CAP]
            alerts = [{**warning("c", n % 60, "2026-03-01T00:00:00+08:00"), "alert_id": f"a{n}", "kind": "downgrade",
                       "as_of": f"2026-01-02T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}+08:00",
                       "severity": "critical" if n % 2 else "warning"} for n in range(ALERTS_CAP + 10)]
            await feed.record([], alerts, [{"reason": "malformed_json"}], arrived=1_800_000_000)
            newest = await feed.alerts(5, severity="critical")
            assert [a["alert_id"] for a in newest] == [f"a{n}" for n in (1009, 1007, 1005, 1003, 1001)]
            assert await client.zcard(feed.keys.alerts) == ALERTS_CAP
            assert await feed.dead_letters() == {"malformed_json": 1}
            rates = await feed.rates(60, now=1_800_000_000)
            assert rates[-1]["causes"] == {"transaction": 2 * len(many)}  # rates count a re-read twice (documented)

            # At risk: soonest first; a later change of the customer ends the warning; a past drop leaves.
            await feed.record([], [warning("x", 1, "2026-02-10T00:00:00+08:00"),
                                   warning("y", 2, "2026-02-01T00:00:00+08:00")], [])
            found, _ = await feed.at_risk(10)
            assert [d["customer_id"] for d in found] == ["y", "x"]
            await feed.record([change("y", 30, "A", "A")], [], [])
            found, _ = await feed.at_risk(10)
            assert [d["customer_id"] for d in found] == ["x"]
            await feed.record([{**change("z", 1, None, "B"), "as_of": "2026-02-11T00:00:00+08:00"}], [], [])
            assert (await feed.at_risk(10))[0] == []
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_keep_sentence_from_the_warning():
    doc = warning("x", 1, "2026-12-14T09:30:00+08:00")
    assert keep_sentence(doc, TZ) == "one purchase before 2026-12-14 09:30 keeps A"
    other = {**doc, "summary": "... Then: 3 purchases in the last 365 days (< 4): F=2."}
    assert keep_sentence(other, TZ).startswith("new activity before 2026-12-14 09:30 keeps A (else: 3 purchases")


def test_console_files_ship_in_the_package():
    files = assets()
    assert {"index.html", "console.js", "console.css"} <= set(files)
    html = files["index.html"][0].decode()
    assert "/console/console.js" in html and "http" not in html.replace("http-equiv", "")  # nothing from a CDN
    assert all(b < 128 for b in files["console.js"][0])  # served without a charset parameter
