"""Grade history per customer and ladder: ordering and answers (pure), bounds and idempotence on the real Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings as hsettings, strategies as st

from schemas.api import CustomerHistory
from schemas.errors import ConfigurationError
from streams.downstream import history
from streams.downstream.history import (APPLIED, DUPLICATE, AsyncHistory, Bounds, Query, customer_keys, in_effect,
                                        member, parse_member)
from streams.settings import load_settings
from streams.tools.cli import main
from streams.tools.explain import explain, render
from tests.streams.downstream_helpers import delete_prefix

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TZ = timezone(timedelta(hours=8))
T0 = datetime(2026, 1, 1, tzinfo=TZ)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    name = f"test-history-{uuid.uuid4().hex[:8]}"
    yield name
    delete_prefix(name, REDIS_URL)


def change(n: int, day: float, grade: str = "A", prev: str | None = "B", ladder: str = "value",
           customer: str = "alice", event_id: str | None = None) -> dict[str, Any]:
    return {"customer_id": customer, "ladder": ladder, "event_id": event_id or f"{customer}-{ladder}-{n}",
            "previous_grade": prev, "grade": grade, "direction": "initial" if prev is None else "downgrade",
            "as_of": (T0 + timedelta(days=day)).isoformat(), "cause": {"kind": "transaction", "event_id": f"t{n}"},
            "ruleset": {"id": "rs", "version": "1"}, "reasons": [f"reason {n}"],
            "metrics": {"recency_days": 1, "frequency": 2, "monetary": "3.00", "r": 1, "f": 2, "m": 3, "code": "123"},
            "emitted_at": "2026-12-01T00:00:00+00:00"}


def at(day: float) -> int:
    return history.epoch_us((T0 + timedelta(days=day)).isoformat())


# --- pure ----------------------------------------------------------------------------------------------------

def test_members_with_the_same_as_of_sort_in_topic_order_and_keep_no_emission_time():
    a, b = member(change(1, 0), 9), member(change(2, 0), 10)
    assert a < b  # Redis orders equal scores by member bytes
    kept = parse_member(a.encode())
    assert kept["event_id"] == "alice-value-1" and kept["offset"] == 9 and "emitted_at" not in kept
    assert kept["ruleset"] == {"id": "rs", "version": "1"} and kept["reasons"] == ["reason 1"]


def test_keys_of_different_customers_and_ladders_never_meet():
    # A ':' in a ladder or a customer id cannot make one customer's key another's.
    keys = customer_keys("P", "a:b", ["c"]) + customer_keys("P", "a", ["b:c"]) + customer_keys("P", "b", ["a"])
    assert len(set(keys)) == len(keys)
    assert history.history_key("P", "a", "b:c") == "P:history:b%3Ac:a"


def test_in_effect_takes_the_last_change_at_or_before_the_instant():
    kept = [parse_member(member(c, i)) for i, c in enumerate(
        [change(0, 1, "A", None), change(1, 5, "B", "A"), change(2, 5, "C", "B"), change(3, 9, "A", "C")])]
    assert in_effect(kept, at(0)) == (None, kept[0], True)  # before the first grade: none yet
    assert in_effect(kept, at(1)) == (kept[0], kept[1], True)
    assert in_effect(kept, at(5)) == (kept[2], kept[3], True)  # equal as_of: the later on the topic
    assert in_effect(kept, at(100)) == (kept[3], None, True)
    trimmed = kept[1:]  # the first grade was dropped by a bound: before the oldest kept is unknown
    assert in_effect(trimmed, at(2)) == (None, kept[1], False)
    assert in_effect([], at(2)) == (None, None, False)


def test_query_refuses_naive_times_bad_limits_and_reversed_windows():
    q = Query.parse({"since": "2026-01-02T00:00:00+08:00", "until": "2026-01-03T00:00:00Z", "limit": "5",
                     "ladder": "value"})
    assert (q.since_us, q.until_us, q.limit, q.ladder) == (at(1), at(1) + 32 * 3600 * 10**6, 5, "value")
    for params, word in (({"since": "2026-01-02T00:00:00"}, "since"), ({"until": "yesterday"}, "until"),
                         ({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"),
                         ({"since": "2026-01-03T00:00:00Z", "until": "2026-01-02T00:00:00Z"}, "since")):
        with pytest.raises(ValueError, match=word):
            Query.parse(params)


def test_settings_out_of_range_are_refused_with_their_name(clean_env):
    assert load_settings().history_max_changes == 100 and load_settings().history_max_age_days == 400
    for name, value in (("history_max_changes", 0), ("history_max_changes", 10_001), ("history_max_age_days", 0),
                        ("history_max_age_days", 4000)):
        with pytest.raises(ConfigurationError, match=f"GRADEFLOW_{name.upper()}"):
            load_settings(**{name: value})


def test_explain_refuses_a_naive_time(capsys):
    assert main(["explain", "--customer", "alice", "--at", "2026-05-15T10:00:00"]) == 2
    err = capsys.readouterr().err
    assert "--at '2026-05-15T10:00:00' has no UTC offset" in err and "RFC 3339" in err


def test_explain_renders_the_change_in_effect_and_the_next():
    kept = [parse_member(member(c, i)) for i, c in enumerate([change(0, 1, "A", None), change(1, 5, "B", "A")])]
    doc = history.body("alice", {"value": {"changes": kept, "oldest": kept[0]},
                                 "loyalty": {"changes": kept[1:], "oldest": kept[1]}}, Bounds(100, 400))
    CustomerHistory.model_validate(doc)  # the API's documented model
    result = explain(doc, T0 + timedelta(days=2))
    assert result["ladders"]["value"]["grade"] == "A" and result["ladders"]["value"]["next"] == kept[1]
    assert result["ladders"]["loyalty"] == {"grade": None, "known": False, "set_by": None, "next": kept[1],
                                            "kept_from": kept[1]["as_of"]}
    text = render(result)
    assert "ladder value: A\n  set 2026-01-02T00:00:00+08:00: (none) → A (initial), cause transaction (event t0), " \
           "ruleset rs@1, change alice-value-0" in text
    assert "reason: reason 0" in text and "monetary=3.00" in text
    assert "ladder loyalty: unknown (before 2026-01-06T00:00:00+08:00" in text


# --- the real Redis ------------------------------------------------------------------------------------------

def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with(prefix: str, bounds: Bounds, work: Any) -> Any:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return await work(AsyncHistory(client, prefix, bounds), client)
    finally:
        await client.aclose()


def test_bounded_by_count_and_by_age_keeping_the_change_in_effect_at_the_age_limit(redis_prefix):
    async def work(h: AsyncHistory, client: Any) -> None:
        days = [0, 10, 20, 30, 400, 405]
        assert await h.record([(change(n, d), n) for n, d in enumerate(days)]) == [APPLIED] * 6
        found = await h.read("alice")
        # Newest 405 days: the limit is day 305; of the older ones only day 30's stays (in effect at day 305).
        assert [c["event_id"] for c in found["value"]["changes"]] == ["alice-value-3", "alice-value-4",
                                                                       "alice-value-5"]
        assert found["value"]["oldest"]["as_of"] == (T0 + timedelta(days=30)).isoformat()
        await h.record([(change(n, 405 + n), n) for n in range(6, 12)])
        assert [c["event_id"] for c in (await h.read("alice"))["value"]["changes"]] == \
            [f"alice-value-{n}" for n in range(7, 12)]  # now the count bound: the latest 5

    run(_with(redis_prefix, Bounds(max_changes=5, max_age_days=100), work))


def test_the_same_change_again_is_a_no_op_and_equal_as_of_keeps_topic_order(redis_prefix):
    async def work(h: AsyncHistory, client: Any) -> None:
        first = [(change(1, 3, "B", "A"), 40), (change(2, 3, "C", "B"), 41), (change(0, 1, "A", None), 12)]
        assert await h.record(first) == [APPLIED] * 3
        # Read again after a crash, or re-emitted with the same id at a later offset: nothing changes.
        assert await h.record([(change(1, 3, "B", "A"), 90), (change(0, 1, "A", None), 12)]) == [DUPLICATE] * 2
        kept = (await h.read("alice"))["value"]["changes"]
        assert [(c["event_id"], c["offset"]) for c in kept] == [("alice-value-0", 12), ("alice-value-1", 40),
                                                                ("alice-value-2", 41)]
        assert await client.zcard(history.history_key(redis_prefix, "alice", "value")) == 3

    run(_with(redis_prefix, Bounds(100, 400), work))


def test_windows_limits_ladders_and_the_latest_across_ladders(redis_prefix):
    async def work(h: AsyncHistory, client: Any) -> None:
        await h.record([(change(n, n), 2 * n) for n in range(10)]
                       + [(change(n, n, ladder="loy:alty"), 2 * n + 1) for n in (2, 7)])
        assert await h.ladders("alice") == ["loy:alty", "value"]
        found = await h.read("alice", ["value"], since_us=at(2), until_us=at(6), limit=3)
        assert [c["event_id"] for c in found["value"]["changes"]] == [f"alice-value-{n}" for n in (4, 5, 6)]
        assert set(found) == {"value"}
        assert [c["event_id"] for c in (await h.read("alice", since_us=at(5)))["loy:alty"]["changes"]] == \
            ["alice-loy:alty-7"]
        latest = await h.latest("alice", 4)
        assert [c["event_id"] for c in latest] == ["alice-value-9", "alice-value-8", "alice-loy:alty-7",
                                                   "alice-value-7"]
        assert await h.read("nobody") == {} and await h.latest("nobody", 3) == []

    run(_with(redis_prefix, Bounds(100, 400), work))


def bounded(arrivals: list[tuple[int, int, str]], bounds: Bounds) -> list[tuple[int, int, str]]:
    """What the history should hold after ``arrivals`` (score, offset, event id), by its stated rules."""
    kept: list[tuple[int, int, str]] = []
    for score, offset, eid in arrivals:
        if any(k[0] == score and k[2] == eid for k in kept):
            continue
        kept = sorted(kept + [(score, offset, eid)])
        cutoff = kept[-1][0] - bounds.max_age_us
        older = [k for k in kept if k[0] < cutoff]
        kept = older[-1:] + [k for k in kept if k[0] >= cutoff]
        kept = kept[-bounds.max_changes:]
    return kept


@pytest.mark.broker  # the real Redis, without the redis_prefix fixture (one prefix per example)
@hsettings(max_examples=30, deadline=None)
@given(days=st.lists(st.integers(0, 60), min_size=1, max_size=30), repeats=st.lists(st.integers(0, 29), max_size=8),
       max_changes=st.integers(1, 12), max_age_days=st.integers(1, 40))
def test_any_sequence_is_bounded_as_stated(days, repeats, max_changes, max_age_days):
    prefix = f"test-history-{uuid.uuid4().hex[:8]}"
    bounds = Bounds(max_changes, max_age_days)
    # as_of never decreases per customer in topic order; the same change may come again at a later offset.
    days = sorted(days)
    arrivals = [(change(n, d), n) for n, d in enumerate(days)]
    arrivals += [(arrivals[r % len(arrivals)][0], len(arrivals) + i) for i, r in enumerate(repeats)]

    async def work(h: AsyncHistory, client: Any) -> list[tuple[int, int, str]]:
        for item in arrivals:
            await h.record([item])
        kept = (await h.read("alice"))["value"]["changes"]
        return [(history.epoch_us(c["as_of"]), c["offset"], c["event_id"]) for c in kept]

    try:
        got = run(_with(prefix, bounds, work))
    finally:
        delete_prefix(prefix, REDIS_URL)
    assert got == bounded([(history.epoch_us(d["as_of"]), o, d["event_id"]) for d, o in arrivals], bounds)


def test_explain_says_the_api_is_unreachable_without_showing_a_password(capsys, clean_env):
    from streams.tools.local import free_port

    url = f"http://ops:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["explain", "--customer", "alice", "--at", "2026-05-15T10:00:00Z", "--api", url]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the API at http://ops:***@127.0.0.1:" in err and "hunter2" not in err
