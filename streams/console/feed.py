"""What the console shows that Redis current grades do not hold: bounded, kept by the ``console-feed`` agent.

The agent consumes the output topics (``grade-changes``, ``grade-alerts``, ``dead-letters``), never the
inputs, and keeps in Redis (``P`` is the prefix, ``GRADEFLOW_REDIS_PREFIX``):

``P:console:alerts`` (sorted set)          the latest :data:`ALERTS_CAP` alerts (downgrades and at-risk
                                           warnings), scored by ``as_of``; each member is the alert's JSON
``P:console:at-risk`` (sorted set)         key customers warned about, member ``customer_id␟ladder``, scored
                                           by the instant of the predicted drop; at most :data:`AT_RISK_CAP`,
                                           the soonest kept
``P:console:at-risk:doc`` (hash)           the same members → the warning's JSON
``P:console:now`` (string)                 the latest ``as_of`` seen (the clock's time; drops before it are past)
``P:console:rate:<minute>`` (hash)         cause → grade changes that arrived in that minute (kept 2 hours)
``P:console:moves:m:<minute>`` (hash)      ``ladder␟from␟to`` → grade changes that arrived in that minute
                                           (kept 2 hours)
``P:console:moves:h:<hour>`` (hash)        the same per hour (kept 26 hours)
``P:console:dead`` (hash)                  reason → dead letters seen

A customer's timeline is read from their grade history (streams/downstream/history.py, kept by the
``redis-writer``): its latest :data:`TIMELINE_CAP` changes over all ladders. Everything here is
bounded whatever the number of customers. Alerts and the at-risk list are sets of deterministic
documents, so a record read again after a crash or a rebalance changes nothing; the per-minute
counts and dead-letter totals may count such a record twice (they are rates to look at, not a ledger).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import orjson

from streams.downstream.history import AsyncHistory, entry as history_entry

ALERTS_CAP = 1000
TIMELINE_CAP = 20
AT_RISK_CAP = 5000
MINUTE_TTL_S = 2 * 3600
HOUR_TTL_S = 26 * 3600
SEP = "\x1f"

# A warning replaces the customer's previous one on the same ladder; the set keeps the soonest drops.
ADD_AT_RISK_LUA = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if extra > 0 then
  local gone = redis.call('ZRANGE', KEYS[1], -extra, -1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], -extra, -1)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return 1
"""

# A later grade change of the customer on that ladder ends the warning: the drop came, or activity
# moved it (a new warning follows when the new drop enters the horizon).
END_AT_RISK_LUA = """
local doc = redis.call('HGET', KEYS[2], ARGV[1])
if not doc then return 0 end
local since = cjson.decode(doc)['as_of_ts']
if tonumber(ARGV[2]) <= tonumber(since) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Drops whose instant has passed leave the list.
PRUNE_AT_RISK_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1000)
if #gone == 0 then return 0 end
redis.call('ZREM', KEYS[1], unpack(gone))
redis.call('HDEL', KEYS[2], unpack(gone))
return #gone
"""

MAX_NOW_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1e18')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def ts(iso: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, or None."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class Keys:
    """The console's Redis keys under one prefix."""

    def __init__(self, prefix: str) -> None:
        base = f"{prefix}:console"
        self.alerts = f"{base}:alerts"
        self.at_risk = f"{base}:at-risk"
        self.at_risk_doc = f"{base}:at-risk:doc"
        self.now = f"{base}:now"
        self.dead = f"{base}:dead"
        self._base = base

    def rate(self, minute: int) -> str:
        return f"{self._base}:rate:{minute}"

    def moves_minute(self, minute: int) -> str:
        return f"{self._base}:moves:m:{minute}"

    def moves_hour(self, hour: int) -> str:
        return f"{self._base}:moves:h:{hour}"


_ALERT_FIELDS = ("alert_id", "customer_id", "ladder", "severity", "summary", "previous_grade", "grade", "as_of",
                 "kind", "due_at", "grade_change_event_id")


def alert_entry(doc: dict[str, Any]) -> dict[str, Any]:
    """What the alert list keeps of an alert (deterministic: no emission time)."""
    out = {name: doc.get(name) for name in _ALERT_FIELDS}
    out["kind"] = out["kind"] or "downgrade"
    return out


class Feed:
    """Writes what the console reads (the ``console-feed`` agent) and reads it (the console's API)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._add_at_risk = redis.register_script(ADD_AT_RISK_LUA)
        self._end_at_risk = redis.register_script(END_AT_RISK_LUA)
        self._prune = redis.register_script(PRUNE_AT_RISK_LUA)
        self._max_now = redis.register_script(MAX_NOW_LUA)
        self.history = AsyncHistory(redis, prefix)

    async def record(self, changes: Iterable[dict[str, Any]], alerts: Iterable[dict[str, Any]],
                     dead: Iterable[dict[str, Any]], arrived: float | None = None) -> None:
        """Keep one batch of output documents (in their topic order), in one pipeline."""
        k = self.keys
        now = time.time() if arrived is None else arrived
        minute, hour = int(now // 60), int(now // 3600)
        pipe = self.redis.pipeline(transaction=False)
        latest: float | None = None
        rate: dict[str, int] = {}
        moves: dict[str, int] = {}
        for doc in alerts:
            entry = alert_entry(doc)
            at = ts(entry["as_of"]) or 0.0
            latest = at if latest is None else max(latest, at)
            pipe.zadd(k.alerts, {orjson.dumps(entry): at})
            if entry["kind"] == "at_risk":
                due = ts(entry["due_at"])
                if due is not None:
                    member = f"{entry['customer_id']}{SEP}{entry['ladder']}"
                    await self._add_at_risk(keys=[k.at_risk, k.at_risk_doc],
                                            args=[member, due, orjson.dumps({**entry, "as_of_ts": at}), AT_RISK_CAP],
                                            client=pipe)
        pipe.zremrangebyrank(k.alerts, 0, -ALERTS_CAP - 1)
        for doc in changes:
            entry = history_entry(doc, -1)
            at = ts(entry["as_of"]) or 0.0
            latest = at if latest is None else max(latest, at)
            await self._end_at_risk(keys=[k.at_risk, k.at_risk_doc],
                                    args=[f"{doc.get('customer_id')}{SEP}{entry['ladder']}", at], client=pipe)
            cause = str(entry["cause"]["kind"])
            rate[cause] = rate.get(cause, 0) + 1
            move = SEP.join((str(entry["ladder"]), entry["previous_grade"] or "-", str(entry["grade"])))
            moves[move] = moves.get(move, 0) + 1
        for name, n in rate.items():
            pipe.hincrby(k.rate(minute), name, n)
        for name, n in moves.items():
            pipe.hincrby(k.moves_minute(minute), name, n)
            pipe.hincrby(k.moves_hour(hour), name, n)
        if rate:
            pipe.expire(k.rate(minute), MINUTE_TTL_S)
            pipe.expire(k.moves_minute(minute), MINUTE_TTL_S)
            pipe.expire(k.moves_hour(hour), HOUR_TTL_S)
        for doc in dead:
            pipe.hincrby(k.dead, str(doc.get("reason") or "unknown"), 1)
        if latest is not None:
            await self._max_now(keys=[k.now], args=[latest], client=pipe)
            # Only the clock's time may retire a warning: its drop is then in the past.
            await self._prune(keys=[k.at_risk, k.at_risk_doc], args=[latest], client=pipe)
        await pipe.execute()

    # Reads of the console's API.

    async def alerts(self, limit: int, severity: str | None = None, ladder: str | None = None,
                     kind: str | None = None) -> list[dict[str, Any]]:
        """The latest alerts, newest first, filtered (scans at most :data:`ALERTS_CAP`)."""
        out = []
        for raw in await self.redis.zrevrange(self.keys.alerts, 0, ALERTS_CAP - 1):
            doc = orjson.loads(raw)
            if (severity and doc.get("severity") != severity) or (ladder and doc.get("ladder") != ladder) \
                    or (kind and doc.get("kind") != kind):
                continue
            out.append(doc)
            if len(out) >= limit:
                break
        return out

    async def at_risk(self, limit: int, ladder: str | None = None) -> tuple[list[dict[str, Any]], float | None]:
        """Warned key customers whose drop is still ahead, soonest first; and the clock's time."""
        k = self.keys
        raw_now = await self.redis.get(k.now)
        now = float(raw_now) if raw_now is not None else None
        low = "-inf" if now is None else now
        members = await self.redis.zrangebyscore(k.at_risk, low, "+inf")
        out: list[dict[str, Any]] = []
        for start in range(0, len(members), 500):
            chunk = members[start:start + 500]
            for raw in await self.redis.hmget(k.at_risk_doc, chunk):
                if raw is None:
                    continue
                doc = orjson.loads(raw)
                doc.pop("as_of_ts", None)
                if ladder and doc.get("ladder") != ladder:
                    continue
                out.append(doc)
                if len(out) >= limit:
                    return out, now
        return out, now

    async def timeline(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's latest :data:`TIMELINE_CAP` grade changes over all ladders, newest first (their history)."""
        return await self.history.latest(customer_id, TIMELINE_CAP)

    async def rates(self, minutes: int = 60, now: float | None = None) -> list[dict[str, Any]]:
        """Grade changes per minute by cause over the last ``minutes`` minutes, oldest first."""
        last = int((time.time() if now is None else now) // 60)
        pipe = self.redis.pipeline(transaction=False)
        span = range(last - minutes + 1, last + 1)
        for minute in span:
            pipe.hgetall(self.keys.rate(minute))
        rows = await pipe.execute()
        return [{"minute": datetime.fromtimestamp(m * 60, timezone.utc).isoformat(), "causes": _ints(row)}
                for m, row in zip(span, rows)]

    async def moves(self, now: float | None = None) -> dict[str, dict[str, dict[tuple[str, str], int]]]:
        """Per window (``hour``: the last 60 minutes, ``day``: the last 24 hours, by hour), per ladder,
        (from, to) → grade changes that arrived in it."""
        t = time.time() if now is None else now
        minute, hour = int(t // 60), int(t // 3600)
        pipe = self.redis.pipeline(transaction=False)
        for m in range(minute - 59, minute + 1):
            pipe.hgetall(self.keys.moves_minute(m))
        for h in range(hour - 23, hour + 1):
            pipe.hgetall(self.keys.moves_hour(h))
        rows = await pipe.execute()
        out: dict[str, dict[str, dict[tuple[str, str], int]]] = {"hour": {}, "day": {}}
        for i, row in enumerate(rows):
            window = out["hour" if i < 60 else "day"]
            for name, n in _ints(row).items():
                ladder, old, new = name.split(SEP)
                cell = window.setdefault(ladder, {})
                cell[(old, new)] = cell.get((old, new), 0) + n
        return out

    async def dead_letters(self) -> dict[str, int]:
        return _ints(await self.redis.hgetall(self.keys.dead))


def _ints(row: dict[Any, Any]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in row.items()}
