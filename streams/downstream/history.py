"""Every customer's grade history per ladder, bounded, in Redis: written from ``grade-changes``.

Key layout (``P`` is the prefix, ``GRADEFLOW_REDIS_PREFIX``); :func:`customer_keys` lists a
customer's keys, so that erasing a customer deletes exactly these:

``P:history:<ladder>:<customer_id>`` (sorted set)
    the customer's grade changes on that ladder, scored by ``as_of`` (µs since the epoch); each
    member is ``<offset on grade-changes, 20 digits>␟<event_id>␟<entry JSON>`` (:func:`entry`), so
    changes with the same ``as_of`` sort in topic order (a late event is graded as of the customer's
    latest event time: equal ``as_of`` is common, and only the topic order says which came last).
    ``<ladder>`` is percent-encoded (no ``:`` in it), so no customer id can reach another's key.
``P:history-ladders:<customer_id>`` (set)
    the ladders the customer has a history on.

One Lua script applies a change atomically: the same ``event_id`` again (a record read twice, or
re-emitted with the same id after a crash) is a no-op — a change's ``as_of`` is part of what its
deterministic id stands for, so only members with the same score need comparing. Then it bounds
the ladder's history: changes more than ``GRADEFLOW_HISTORY_MAX_AGE_DAYS`` older (in event time)
than the newest one go, except the latest of them — the one still in effect at that limit, so any
instant since the limit has an answer — and then the oldest beyond ``GRADEFLOW_HISTORY_MAX_CHANGES``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from streams.downstream.redis_grades import epoch_us

SEP = "\x1f"
DAY_US = 86_400 * 1_000_000

APPLIED, DUPLICATE = 1, 0

RECORD_LUA = """
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
  if string.find(m, ARGV[3], 1, true) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
-- Scores are integers below 2^53, exact as doubles; format them ourselves (Lua would print 14 digits).
local cutoff = string.format('%d', tonumber(newest[2]) - tonumber(ARGV[6]))
local older = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. cutoff)
if older > 1 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, older - 2) end
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
return 1
"""


def history_key(prefix: str, customer_id: str, ladder: str) -> str:
    return f"{prefix}:history:{quote(ladder, safe='')}:{customer_id}"


def ladders_key(prefix: str, customer_id: str) -> str:
    return f"{prefix}:history-ladders:{customer_id}"


def customer_keys(prefix: str, customer_id: str, ladders: Iterable[str]) -> list[str]:
    """Every history key of one customer, given the members of :func:`ladders_key` (erasure deletes these)."""
    return [ladders_key(prefix, customer_id)] + [history_key(prefix, customer_id, lad) for lad in ladders]


@dataclass(frozen=True)
class Bounds:
    max_changes: int
    max_age_days: float

    @property
    def max_age_us(self) -> int:
        return int(self.max_age_days * DAY_US)

    @classmethod
    def of(cls, settings: Any) -> "Bounds":
        return cls(settings.history_max_changes, settings.history_max_age_days)


def entry(doc: dict[str, Any], offset: int) -> dict[str, Any]:
    """What the history keeps of a grade change (deterministic: no emission time)."""
    cause = doc.get("cause") or {}
    return {"event_id": doc.get("event_id"), "ladder": doc.get("ladder"), "previous_grade": doc.get("previous_grade"),
            "grade": doc.get("grade"), "direction": doc.get("direction"), "as_of": doc.get("as_of"),
            "cause": {"kind": cause.get("kind"), "event_id": cause.get("event_id")},
            "ruleset": doc.get("ruleset"), "metrics": doc.get("metrics"), "reasons": doc.get("reasons") or [],
            "offset": offset}


def member(doc: dict[str, Any], offset: int) -> str:
    """The sorted-set member of a change at ``offset`` (equal scores sort by it: topic order)."""
    return f"{offset:020d}{SEP}{doc['event_id']}{SEP}{orjson.dumps(entry(doc, offset)).decode()}"


def parse_member(raw: bytes | str) -> dict[str, Any]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return dict(orjson.loads(text.split(SEP, 2)[2]))


def script_call(prefix: str, doc: dict[str, Any], offset: int, bounds: Bounds) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :data:`RECORD_LUA` for one grade-change document at ``offset``."""
    cid, ladder = doc["customer_id"], doc["ladder"]
    keys = [history_key(prefix, cid, ladder), ladders_key(prefix, cid)]
    args = [str(epoch_us(doc["as_of"])), member(doc, offset), f"{SEP}{doc['event_id']}{SEP}", ladder,
            bounds.max_changes, str(bounds.max_age_us)]
    return keys, args


def in_effect(changes: Sequence[dict[str, Any]], at_us: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                                                      bool]:
    """For one ladder's changes (oldest first, as kept): the change in effect at ``at_us``, the next one after
    it, and whether the answer is known. Before the oldest change kept the grade is known only if that
    change is the customer's first grade on the ladder (no previous grade): then there was none."""
    current: dict[str, Any] | None = None
    for change in changes:
        if epoch_us(change["as_of"]) <= at_us:
            current = change
        else:
            return current, change, current is not None or change.get("previous_grade") is None
    return current, None, current is not None


MAX_LIMIT = 10_000


@dataclass(frozen=True)
class Query:
    """The query of ``GET /customers/{customer_id}/history``."""

    ladder: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    limit: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> "Query":
        """From query parameters; ValueError (answered 400) names the parameter that is wrong."""
        from schemas.errors import InvalidEvent
        from schemas.timestamps import parse_rfc3339

        times: dict[str, int | None] = {}
        for name in ("since", "until"):
            raw = params.get(name) or None
            try:
                times[name] = None if raw is None else epoch_us(parse_rfc3339(raw, name).isoformat())
            except InvalidEvent as exc:
                raise ValueError(f"{exc.message} (RFC 3339 with an offset, e.g. 2026-05-15T10:00:00+08:00)") from None
        limit = None
        if params.get("limit"):
            try:
                limit = int(params["limit"])
            except ValueError:
                raise ValueError("limit must be an integer") from None
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        since, until = times["since"], times["until"]
        if since is not None and until is not None and since > until:
            raise ValueError("since is after until")
        return cls(params.get("ladder") or None, since, until, limit)


def body(customer_id: str, found: dict[str, dict[str, Any]], bounds: Bounds) -> dict[str, Any]:
    """The answer of ``GET /customers/{customer_id}/history`` (schemas.api.CustomerHistory)."""
    ladders = {ladder: {"changes": part["changes"], "kept_from": part["oldest"]["as_of"],
                        "complete": part["oldest"].get("previous_grade") is None}
               for ladder, part in sorted(found.items())}
    return {"customer_id": customer_id, "ladders": ladders, "max_changes": bounds.max_changes,
            "max_age_days": bounds.max_age_days}


def sort_key(change: dict[str, Any]) -> tuple[int, int]:
    """Order of a customer's changes (across ladders too: a customer's changes share one partition)."""
    return epoch_us(change["as_of"]), int(change.get("offset") or 0)


class AsyncHistory:
    """Record grade changes and read histories with an asyncio Redis client."""

    def __init__(self, redis: Any, prefix: str, bounds: Bounds | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.bounds = bounds
        self.script = redis.register_script(RECORD_LUA)

    def queue(self, pipe: Any, changes: Sequence[tuple[dict[str, Any], int]]) -> list[Any]:
        """Add the script calls of (change, offset) pairs to ``pipe``; await each returned call before executing it."""
        if self.bounds is None:
            raise ValueError("a history that records changes needs its bounds")
        calls = []
        for doc, offset in changes:
            keys, args = script_call(self.prefix, doc, offset, self.bounds)
            calls.append(self.script(keys=keys, args=args, client=pipe))
        return calls

    async def record(self, changes: Sequence[tuple[dict[str, Any], int]]) -> list[int]:
        """Record (change, offset) pairs in one pipeline; one result per change (APPLIED/DUPLICATE)."""
        if not changes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for call in self.queue(pipe, changes):
            await call
        return [int(r) for r in await pipe.execute()]

    async def ladders(self, customer_id: str) -> list[str]:
        raw = await self.redis.smembers(ladders_key(self.prefix, customer_id))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in raw)

    async def read(self, customer_id: str, ladders: Iterable[str] | None = None, since_us: int | None = None,
                   until_us: int | None = None, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Per ladder with a history: ``changes`` oldest first, within [since, until] (the latest ``limit`` of them),
        and ``oldest`` (the oldest change kept at all, whatever the window)."""
        names = list(ladders) if ladders is not None else await self.ladders(customer_id)
        low = "-inf" if since_us is None else str(since_us)
        high = "+inf" if until_us is None else str(until_us)
        pipe = self.redis.pipeline(transaction=False)
        for ladder in names:
            key = history_key(self.prefix, customer_id, ladder)
            if limit is None:
                pipe.zrangebyscore(key, low, high)
            else:
                pipe.zrevrangebyscore(key, high, low, start=0, num=limit)
            pipe.zrange(key, 0, 0)
        rows = await pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for i, ladder in enumerate(names):
            window, oldest = rows[2 * i], rows[2 * i + 1]
            if not oldest:
                continue
            changes = [parse_member(m) for m in window]
            if limit is not None:
                changes.reverse()
            out[ladder] = {"changes": changes, "oldest": parse_member(oldest[0])}
        return out

    async def latest(self, customer_id: str, n: int) -> list[dict[str, Any]]:
        """The customer's latest ``n`` changes over all ladders, newest first."""
        names = await self.ladders(customer_id)
        pipe = self.redis.pipeline(transaction=False)
        for ladder in names:
            pipe.zrevrange(history_key(self.prefix, customer_id, ladder), 0, n - 1)
        found = [parse_member(m) for row in (await pipe.execute() if names else []) for m in row]
        found.sort(key=sort_key, reverse=True)
        return found[:n]


def record_sync(redis: Any, prefix: str, changes: Sequence[tuple[dict[str, Any], int]], bounds: Bounds,
                script: Any = None) -> list[int]:
    """:meth:`AsyncHistory.record` with a blocking client (``gradeflow redis rebuild``)."""
    if not changes:
        return []
    script = script or redis.register_script(RECORD_LUA)
    pipe = redis.pipeline(transaction=False)
    for doc, offset in changes:
        keys, args = script_call(prefix, doc, offset, bounds)
        script(keys=keys, args=args, client=pipe)
    return [int(r) for r in pipe.execute()]
