"""Current grades in Redis, written from the ``grade-changes`` topic, never backwards.

Key layout (``P`` is the prefix: ``GRADEFLOW_REDIS_PREFIX``, default the app id);
docs/downstream.md is the reference for downstream teams:

``P:customer:<customer_id>`` (hash), per ladder ``L`` of the ruleset:
    ``L``        the current grade as JSON: ``grade``, ``previous_grade``,
                 ``direction``, ``as_of``, ``event_id``, ``ruleset``, ``metrics``,
                 ``emitted_at``, ``offset`` (of the change on ``grade-changes``)
    ``L@grade``  the grade alone
    ``L@ts``     ``as_of`` in microseconds since the epoch (the version, first part)
    ``L@seq``    offset of the change on ``grade-changes`` (the version, second part)
    ``L@id``     ``event_id`` of the change
``P:grades:<ladder>`` (hash): grade → number of customers currently in it.
``P:ladders`` (set): ladders that have counts.

A change is applied by one Lua script (EVALSHA) that compares versions
atomically: it is written only if its ``as_of`` is later than the stored one,
or equal and later on the topic (higher offset: the grading agent emits a
customer's changes in order, and a late event is graded as of the customer's
latest event time, so equal ``as_of`` is common and the topic order decides).
The same ``event_id`` again is a no-op. Counts move only when a write is
applied, inside the same script, so they always equal the number of customer
hashes per grade. A single Redis (not Cluster) is assumed: the script touches a
customer key and a ladder key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from streams.faustext.tables import RESERVED
from streams.readback import read_to_end

log = logging.getLogger("gradeflow.redis")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

APPLIED, DUPLICATE, STALE = 1, 0, -1
RESULT_NAMES = {APPLIED: "applied", DUPLICATE: "duplicate", STALE: "stale"}

APPLY_LUA = """
local ladder = ARGV[1]
local ts = tonumber(ARGV[2])
local seq = tonumber(ARGV[3])
local cur = redis.call('HMGET', KEYS[1], ladder .. '@ts', ladder .. '@seq', ladder .. '@id', ladder .. '@grade')
if cur[1] then
  if cur[3] == ARGV[4] then return 0 end
  local cts = tonumber(cur[1])
  if ts < cts then return -1 end
  if ts == cts and seq <= tonumber(cur[2]) then return -1 end
end
redis.call('HSET', KEYS[1], ladder, ARGV[6], ladder .. '@ts', ARGV[2], ladder .. '@seq', ARGV[3],
           ladder .. '@id', ARGV[4], ladder .. '@grade', ARGV[5])
if cur[4] ~= ARGV[5] then
  if cur[4] then redis.call('HINCRBY', KEYS[2], cur[4], -1) end
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
  redis.call('SADD', KEYS[3], ladder)
end
return 1
"""

# Fill a ladder that Redis does not have at all (rebuild from the tables, see :func:`fill_from_tables`).
FILL_LUA = """
local ladder = ARGV[1]
if redis.call('HEXISTS', KEYS[1], ladder) == 1 then return 0 end
redis.call('HSET', KEYS[1], ladder, ARGV[6], ladder .. '@ts', ARGV[2], ladder .. '@seq', ARGV[3],
           ladder .. '@id', ARGV[4], ladder .. '@grade', ARGV[5])
redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
redis.call('SADD', KEYS[3], ladder)
return 1
"""


def customer_key(prefix: str, customer_id: str) -> str:
    return f"{prefix}:customer:{customer_id}"


def counts_key(prefix: str, ladder: str) -> str:
    return f"{prefix}:grades:{ladder}"


def ladders_key(prefix: str) -> str:
    return f"{prefix}:ladders"


def epoch_us(iso: str) -> int:
    """Microseconds since the epoch of an RFC 3339 time (exact, no float)."""
    return (datetime.fromisoformat(iso) - _EPOCH) // timedelta(microseconds=1)


def script_call(prefix: str, change: dict[str, Any], offset: int) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :data:`APPLY_LUA` for one grade-change document at ``offset``."""
    ladder = change["ladder"]
    current = {
        "grade": change["grade"],
        "previous_grade": change.get("previous_grade"),
        "direction": change.get("direction"),
        "as_of": change["as_of"],
        "event_id": change["event_id"],
        "ruleset": change.get("ruleset"),
        "metrics": change.get("metrics"),
        "emitted_at": change.get("emitted_at"),
        "offset": offset,
    }
    keys = [customer_key(prefix, change["customer_id"]), counts_key(prefix, ladder), ladders_key(prefix)]
    args = [ladder, epoch_us(change["as_of"]), offset, change["event_id"], change["grade"], orjson.dumps(current)]
    return keys, args


def parse_change(value: bytes | None) -> dict[str, Any] | None:
    """A grade-change document, or None (logged) if it is not one."""
    try:
        doc = orjson.loads(value or b"")
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        for name in ("customer_id", "ladder", "grade", "as_of", "event_id"):
            if not isinstance(doc.get(name), str):
                raise ValueError(f"missing {name}")
        epoch_us(doc["as_of"])
        return doc
    except (ValueError, TypeError) as exc:
        log.warning("gradeflow: skipping a record on grade-changes that is not a grade change: %s", exc)
        return None


class AsyncGrades:
    """Apply grade changes and read current grades with an asyncio Redis client."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.script = redis.register_script(APPLY_LUA)

    async def apply(self, changes: Sequence[tuple[dict[str, Any], int]]) -> list[int]:
        """Apply (change, offset) pairs in one pipeline; one result per change (APPLIED/DUPLICATE/STALE)."""
        if not changes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for change, offset in changes:
            keys, args = script_call(self.prefix, change, offset)
            await self.script(keys=keys, args=args, client=pipe)
        return [int(r) for r in await pipe.execute()]

    async def customer(self, customer_id: str, ladders: Iterable[str]) -> dict[str, Any]:
        """Current grades of one customer by ladder (only ladders with a grade)."""
        ladders = list(ladders)
        raw = await self.redis.hmget(customer_key(self.prefix, customer_id), ladders)
        return {ladder: orjson.loads(v) for ladder, v in zip(ladders, raw) if v is not None}

    async def counts(self, ladders: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        """Customers per grade, per ladder (the given ladders and every ladder Redis knows)."""
        names = set(ladders)
        names.update(m.decode() if isinstance(m, bytes) else m
                     for m in await self.redis.smembers(ladders_key(self.prefix)))
        out: dict[str, dict[str, int]] = {}
        for ladder in sorted(names):
            raw = await self.redis.hgetall(counts_key(self.prefix, ladder))
            out[ladder] = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        return out


def apply_sync(redis: Any, prefix: str, changes: Sequence[tuple[dict[str, Any], int]], script: Any = None) -> list[int]:
    """:meth:`AsyncGrades.apply` with a blocking client (the ``redis rebuild`` command)."""
    script = script or redis.register_script(APPLY_LUA)
    pipe = redis.pipeline(transaction=False)
    for change, offset in changes:
        keys, args = script_call(prefix, change, offset)
        script(keys=keys, args=args, client=pipe)
    return [int(r) for r in pipe.execute()] if changes else []


def clear(redis: Any, prefix: str) -> int:
    """Delete every current-grade key under ``prefix`` (not the alert keys); return how many."""
    n = 0
    for pattern in (f"{prefix}:customer:*", f"{prefix}:grades:*"):
        batch = []
        for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += redis.delete(*batch)
                batch = []
        if batch:
            n += redis.delete(*batch)
    n += redis.delete(ladders_key(prefix))
    return n


def rebuild(settings: Any, clear_first: bool = False, batch: int = 1000,
            progress: Any = None, fill_tables: bool = True) -> dict[str, int]:
    """Read ``grade-changes`` from the beginning to its current end and apply it to Redis.

    Applying uses the same script as the worker, so a rebuild on top of a
    live Redis never moves a grade backwards; the changes still on the topic
    also go to the histories (streams/downstream/history.py, idempotent); ``clear_first`` deletes the
    current-grade keys first (for a Redis that holds wrong data). Then, unless
    ``fill_tables`` is false, ladders still missing are filled from the table
    changelog (:func:`fill_from_tables`).
    """
    import redis as redis_lib
    from kafka import KafkaConsumer, TopicPartition

    from streams.downstream import history
    from streams.kafka_config import kafka_python_options
    from streams.settings import redis_prefix

    prefix = redis_prefix(settings)
    client = redis_lib.Redis.from_url(settings.redis_url.get_secret_value())
    client.ping()
    stats = {"read": 0, "applied": 0, "duplicate": 0, "stale": 0, "skipped": 0, "cleared": 0}
    if clear_first:
        stats["cleared"] = clear(client, prefix)
    script = client.register_script(APPLY_LUA)
    history_script = client.register_script(history.RECORD_LUA)
    bounds = history.Bounds.of(settings)
    topic = settings.topics.grade_changes
    # read_committed: with exactly_once, what an aborted transaction wrote (changes, table
    # states) was never published.
    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
                             client_id=f"{settings.app_id}-redis-rebuild")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        pending: list[tuple[dict[str, Any], int]] = []

        def flush() -> None:
            for r in apply_sync(client, prefix, pending, script):
                stats[RESULT_NAMES[r]] += 1
            history.record_sync(client, prefix, pending, bounds, history_script)
            pending.clear()

        for _tp, records in read_to_end(consumer, tps, max_records=batch):
            for record in records:
                stats["read"] += 1
                doc = parse_change(record.value)
                if doc is None:
                    stats["skipped"] += 1
                    continue
                pending.append((doc, record.offset))
            if len(pending) >= batch:
                flush()
                if progress:
                    progress(stats)
        flush()
        if fill_tables:
            stats["filled_from_tables"] = fill_from_tables(settings, client, consumer)
    finally:
        consumer.close()
        client.close()
    return stats


def fill_from_tables(settings: Any, client: Any, consumer: Any) -> int:
    """Write the ladders that Redis still lacks from the table changelog (the worker's own state).

    ``grade-changes`` is compacted by customer id, so with several ladders it
    keeps only each customer's latest change: the other ladders' current grades
    are gone from the topic but not from the ``customer-state`` table. Such a
    grade is written only where Redis has nothing for the ladder, with ``as_of``
    the customer's latest event time, no event id and no metrics; the next real
    change replaces it (same or later ``as_of``, and a real offset beats ``-1``).
    """
    from datetime import datetime, timezone

    from kafka import TopicPartition

    from rules.state import CustomerState
    from streams.settings import redis_prefix

    prefix = redis_prefix(settings)
    topic = settings.changelog_topic("customer-state")
    parts = consumer.partitions_for_topic(topic) or set()
    if not parts:
        return 0
    latest: dict[bytes, bytes | None] = {}
    for _tp, records in read_to_end(consumer, [TopicPartition(topic, p) for p in sorted(parts)]):
        for record in records:
            if record.key is not None:
                latest[record.key] = record.value
    script = client.register_script(FILL_LUA)
    filled = 0
    pipe = client.pipeline(transaction=False)
    queued = 0
    for key, raw in latest.items():
        if raw is None or key.startswith(RESERVED):  # a tombstone, or a key of the table's own
            continue
        try:
            state = CustomerState.from_bytes(raw)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            log.warning("gradeflow: rebuild skips an unreadable table value for %r: %s", key, exc)
            continue
        if not state.grades or state.last_event_ts is None:
            continue
        customer = key.decode("utf-8", errors="replace")
        as_of = datetime.fromtimestamp(state.last_event_ts, timezone.utc).isoformat()
        for ladder, grade in state.grades.items():
            doc = {"grade": grade, "previous_grade": None, "direction": None, "as_of": as_of, "event_id": None,
                   "ruleset": None, "metrics": None, "emitted_at": None, "offset": -1, "from": "table"}
            script(keys=[customer_key(prefix, customer), counts_key(prefix, ladder), ladders_key(prefix)],
                   args=[ladder, epoch_us(as_of), -1, "", grade, orjson.dumps(doc)], client=pipe)
            queued += 1
        if queued >= 1000:
            filled += sum(int(r) for r in pipe.execute())
            pipe = client.pipeline(transaction=False)
            queued = 0
    if queued:
        filled += sum(int(r) for r in pipe.execute())
    return filled
