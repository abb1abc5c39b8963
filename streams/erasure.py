"""Customer erasure on the workers: requests in, state and copies removed, a receipt out.

docs/erasure.md is the reference (what is erased where, what stays, what the team must do).
The parts, all here; the pure ones are in rules/erasure.py:

- **Markers.** Every worker follows the compacted marker topic from its beginning with its
  own group-less consumer (as streams/population.py follows its topic) into an
  :class:`rules.erasure.Erasures`; the batch handler passes it to ``process_batch``, which
  refuses an erased customer's events that occurred at or before the erasure. The handler
  grades nothing until the topic has been read to the end it had at start (:attr:`Erasure.ready`):
  a restart that replays old events must know every erasure first.
- **Visits.** Producers may partition as they like, so nobody can tell which worker holds a
  customer's state. The request topic is an input, co-partitioned with the others: a request
  is written to partition 0 and *visits* each input partition in turn. The owner of
  partition *p* (the ``customer-erasures`` agent) records the erasure locally, at *p* = 0 first
  writes the marker, then, under the writer lock (streams/clock.py), tombstones the state it
  holds on *p* in the table and its changelog and forgets it in the clock's schedule, and writes
  the request on to partition *p* + 1. Its offset is committed only after that: a crash
  re-does the visit (every step is idempotent).
- **The last visit** writes a tombstone keyed by the customer on the compacted output topics,
  removes the customer's keys and entries from Redis (:func:`erase_redis`) and writes the
  receipt on ``erasure-receipts``.
- **Downstream agents** drop output records of an erased customer graded at or before the
  erasure (:func:`keep`): one read late after the erasure must not write the customer back to Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from rules.changes import uuid5
from rules.erasure import Erasures, decode_instant, encode_instant
from rules.state import CustomerState
from schemas import SCHEMA_VERSION
from schemas.events import CustomerErasure
from streams.faustext.outbox import Outbox
from streams.settings import Settings, erasure_topics, redis_prefix, shadow_diffs_topic, shadow_ruleset_names

log = logging.getLogger("gradeflow.erasure")

# Grades of a customer: drop the hash and take the customer out of each ladder's counts, atomically
# (the redis-writer moves counts in one script too, streams/downstream/redis_grades.py).
ERASE_GRADES_LUA = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, -6) == '@grade' then
    redis.call('HINCRBY', ARGV[1] .. ':grades:' .. string.sub(f, 1, -7), fields[i + 1], -1)
  end
end
return redis.call('DEL', KEYS[1])
"""

VISITED_MEMORY = 10_000
_GLOB_SPECIAL = "\\*?[]"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


async def erase_redis(redis: Any, prefix: str, customer_id: str) -> int:
    """Remove every Redis key and entry of ``customer_id`` under ``prefix``; return how many.

    Current grades (and their counts), the grade history (which the console's timeline reads), at-risk entries and alert-list
    entries, the alert dispatcher's cooldown, open-incident, recovery and firing marks. Delivered
    alert ids (``…:alert:sent:…``) are random-looking ids and stay until they expire.
    """
    from streams.console.feed import SEP, Keys
    from streams.downstream import history
    from streams.downstream.redis_grades import customer_key

    n = int(await redis.eval(ERASE_GRADES_LUA, 1, customer_key(prefix, customer_id), prefix))
    console = Keys(prefix)
    ladders = [_text(m) for m in await redis.smembers(history.ladders_key(prefix, customer_id))]
    n += int(await redis.delete(*history.customer_keys(prefix, customer_id, ladders)))
    members = [field async for field, _ in redis.hscan_iter(console.at_risk_doc,
                                                            match=glob_escape(customer_id + SEP) + "*")]
    if members:
        await redis.zrem(console.at_risk, *members)
        n += int(await redis.hdel(console.at_risk_doc, *members))
    listed = [m for m in await redis.zrange(console.alerts, 0, -1) if orjson.loads(m).get("customer_id") == customer_id]
    if listed:
        n += int(await redis.zrem(console.alerts, *listed))
    # Alert marks are keyed by the dedup key, gradeflow/<ladder>/<customer>/<kind> (rules/changes.py, rules/risk.py).
    endings = (f"/{customer_id}/key-downgrade", f"/{customer_id}/at-risk")
    alert = glob_escape(f"{prefix}:alert:")
    marks = [key async for key in redis.scan_iter(match=f"{alert}*/{glob_escape(customer_id)}/*", count=1000)
             if _text(key).endswith(endings)]
    if marks:
        n += int(await redis.delete(*marks))
    async for firing in redis.scan_iter(match=f"{alert}firing:*", count=100):
        fields = [f async for f, _ in redis.hscan_iter(firing, match=f"*/{glob_escape(customer_id)}/*")
                  if _text(f).endswith(endings)]
        if fields:
            n += int(await redis.hdel(firing, *fields))
    return n


def merged_ids(raw: bytes | None) -> list[str]:
    """The ids merged into the customer whose state is ``raw`` (docs/customers.md)."""
    return sorted(set(CustomerState.from_bytes(raw).merges.values())) if raw is not None else []


def request(customer_id: str, erasure_id: str, requested_at: datetime) -> bytes:
    """A request's value, as ``gradeflow customers erase`` writes it (key: the erasure id)."""
    return CustomerErasure(erasure_id=erasure_id, customer_id=customer_id,
                           requested_at=requested_at).model_dump_json().encode()


class Erasure:
    """One worker's side of erasure: the markers it knows, its visits, the last visit's work."""

    def __init__(self, app: Any, settings: Settings, store: Any, clock: Any, writer: asyncio.Lock,
                 producer: Callable[[], Any], redis: Callable[[], Any] | None = None) -> None:
        assert settings.erasure_key is not None
        self.app, self.settings, self.store, self.clock, self.writer = app, settings, store, clock, writer
        self.producer = producer
        self.redis = redis
        self.topics = erasure_topics(settings)
        self.erasures = Erasures(settings.erasure_key.get_secret_value().encode())
        self.ready = asyncio.Event()
        self.visits = 0
        self.receipts = 0
        # (erasure id, partition) of the visits done here, the latest VISITED_MEMORY: a request
        # re-done after a takeover is passed on again, and each copy would repeat every later visit.
        self.visited: dict[tuple[str, int], None] = {}

    # ------------------------------------------------------------ markers

    async def follow(self) -> None:
        """Read the marker topic from its beginning, for ever; :attr:`ready` once at its start-time end."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from streams.kafka_config import kafka_python_options

        consumer = AIOKafkaConsumer(group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                                    **kafka_python_options(self.settings))
        await consumer.start()
        try:
            tp = TopicPartition(self.topics.markers, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            if end == 0:
                self.ready.set()
            while True:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        if record.key is not None and record.value is not None:
                            self.erasures.add(record.key, decode_instant(record.value))
                        if record.offset + 1 >= end:
                            self.ready.set()
                if not self.ready.is_set() and await consumer.position(tp) >= end:
                    self.ready.set()
        finally:
            await consumer.stop()

    # ------------------------------------------------------------ visits

    async def visit(self, raw: bytes, partition: int) -> None:
        """The request ``raw`` read on partition ``partition`` of the request topic (this worker owns it)."""
        doc = CustomerErasure.model_validate_json(raw)
        if (doc.erasure_id, partition) in self.visited:
            return
        if doc.partition != partition:
            log.warning("gradeflow: an erasure request for partition %d was read on partition %d; visiting %d",
                        doc.partition, partition, partition)
        customer_id = doc.customer_id
        at = doc.requested_at.timestamp()
        marker = self.erasures.erase(customer_id, at)  # refused here from now on
        producer = self.producer()
        outbox = Outbox()
        if partition == 0:
            # Before any state goes: every worker then refuses the customer's old events, whoever owns them.
            outbox.add(self.topics.markers, marker, encode_instant(at), 0)
            await (await outbox.send(producer)).acked()
        state_partition = doc.state_partition
        key = customer_id.encode()
        async with self.writer:
            if self.store.holds(key, partition):
                # Ids merged into this customer (streams/merging.py) are this customer too: each
                # is erased by a request of its own, queued before the state that names them goes.
                for from_id in merged_ids(self.store.get_key(key)):
                    erasure_id = uuid5(f"erasure\x1f{doc.erasure_id}\x1f{from_id}")
                    outbox.add(self.topics.requests, erasure_id.encode(), request(from_id, erasure_id, doc.requested_at), 0)
                self.store.delete_many(outbox, [(key, partition)])
                await self.store.settle(await outbox.send(producer))
                state_partition = partition
            self._forget(key, partition)
        self.visits += 1
        last = partition + 1 >= self.settings.partitions
        done = (doc.erasure_id, partition)
        doc = doc.model_copy(update={"partition": partition + 1, "state_partition": state_partition})
        if not last:
            outbox.add(self.topics.requests, doc.erasure_id.encode(), doc.model_dump_json().encode(), partition + 1)
            await (await outbox.send(producer)).acked()
        else:
            await self.finish(doc)
        self.visited[done] = None
        if len(self.visited) > VISITED_MEMORY:
            del self.visited[next(iter(self.visited))]

    def _forget(self, key: bytes, partition: int) -> None:
        clock = self.clock
        if clock is None:
            return
        clock.pending.pop(key, None)
        schedule = clock.schedules.get(partition)
        if schedule is not None:
            schedule.set(key, None)

    async def finish(self, doc: CustomerErasure) -> None:
        """The last visit: output tombstones, Redis, then the receipt."""
        settings, producer = self.settings, self.producer()
        key = doc.customer_id.encode()
        compacted = [settings.topics.grade_changes] if "compact" in settings.grade_changes_cleanup_policy else []
        if shadow_ruleset_names(settings):
            compacted.append(shadow_diffs_topic(settings))  # the customer's shadow grades (rules/shadow.py)
        outbox = Outbox()
        for topic in compacted:
            outbox.add(topic, key, None)  # placed by key, like the customer's changes
        if outbox:
            await (await outbox.send(producer)).acked()
        removed = 0
        if self.redis is not None:
            removed = await erase_redis(self.redis(), redis_prefix(settings), doc.customer_id)
        receipt = {
            "schema_version": SCHEMA_VERSION,
            "erasure_id": doc.erasure_id,
            "customer_id": doc.customer_id,
            "requested_at": doc.requested_at.isoformat(),
            "completed_at": datetime.now(timezone.utc).isoformat(),
            "removed": {"state_partition": doc.state_partition, "output_tombstones": compacted, "redis_keys": removed},
            "retained": retained(settings),
        }
        outbox.add(self.topics.receipts, key, orjson.dumps(receipt), 0)
        await (await outbox.send(producer)).acked()
        self.receipts += 1
        log.info("gradeflow: erasure %s done (state %s, %d Redis entries)", doc.erasure_id,
                 "removed" if doc.state_partition is not None else "not held", removed)

    # ------------------------------------------------------------ downstream

    def keep(self, events: list[Any]) -> list[Any]:
        """``events`` of the output topics without those of an erased customer graded at or before the
        erasure (the downstream agents' batches: streams/downstream/wiring.py)."""
        erasures = self.erasures
        if not erasures:
            return events
        kept = []
        for event in events:
            m = event.message
            if m.key is not None and m.value is not None and erasures.erased_at(_text(m.key)) is not None:
                try:
                    doc = orjson.loads(m.value)
                except orjson.JSONDecodeError:
                    doc = None
                if isinstance(doc, dict) and self.erased(doc):
                    continue
            kept.append(event)
        return kept

    def erased(self, doc: dict[str, Any]) -> bool:
        """Whether an output document (a change, an alert) is of an erased customer, graded at or
        before the erasure."""
        at = self.erasures.erased_at(str(doc.get("customer_id", "")))
        if at is None:
            return False
        as_of = doc.get("as_of")
        try:
            return as_of is None or datetime.fromisoformat(str(as_of)).timestamp() <= at
        except ValueError:
            return True


def retained(settings: Settings) -> list[str]:
    """What an erasure leaves by design, in words (the receipt's ``retained``)."""
    days = 86400_000
    names, topics = settings.topics, erasure_topics(settings)
    return [
        f"a refusal marker on {topics.markers}: HMAC-SHA256 of the customer id under the erasure key, and the "
        f"erasure instant; no personal data",
        f"records on the input topics ({names.transactions}, {names.interactions}) until their retention ends; "
        f"they are refused, never graded again",
        f"alerts on {names.alerts} and dead letters on {names.dead_letters} until their retention ends "
        f"({settings.alerts_retention_ms // days} and {settings.dead_letters_retention_ms // days} days)",
        f"the request on {topics.requests} and this receipt on {topics.receipts} until their retention ends "
        f"({settings.erasure_requests_retention_ms // days} and {settings.erasure_receipts_retention_ms // days} days)",
    ]


def attach_erasure(app: Any, settings: Settings, store: Any, clock: Any, writer: asyncio.Lock,
                   producer: Callable[[], Any]) -> Erasure | None:
    """Follow the markers and visit requests (GRADEFLOW_ERASURE_KEY set), else None."""
    if settings.erasure_key is None:
        return None

    def redis() -> Any:
        ds = getattr(app, "gradeflow_downstream", None)
        if ds is not None:
            return ds.redis()
        import redis.asyncio as aioredis

        client = getattr(app, "gradeflow_erasure_redis", None)
        if client is None:
            client = app.gradeflow_erasure_redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(),
                                                                          socket_timeout=5)
        return client

    erasure = Erasure(app, settings, store, clock, writer, producer, redis)
    app.gradeflow_erasure = erasure
    names = erasure.topics
    requests = app.topic(names.requests, key_type=bytes, value_type=bytes)

    @app.task
    async def _erasure_follow() -> None:
        while True:
            try:
                await erasure.follow()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - grading waits for the markers; retry
                log.exception("gradeflow: following the erasure markers failed; retrying in 5 s")
                await asyncio.sleep(5)

    @app.agent(requests, name="customer-erasures")
    async def _visits(stream: Any) -> None:
        async for event in stream.events():
            await erasure.ready.wait()
            m = event.message
            try:
                CustomerErasure.model_validate_json(m.value or b"")
            except ValueError as exc:  # pydantic's ValidationError is one; its text would repeat the record
                log.warning("gradeflow: skipping a record on %s that is not an erasure request (%s)",
                            names.requests, type(exc).__name__)
                continue
            while True:
                try:
                    await erasure.visit(m.value, m.partition)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - broker or Redis away: the visit is re-done, never skipped
                    log.exception("gradeflow: an erasure visit failed; retrying in 2 s")
                    await asyncio.sleep(2)

    return erasure
