"""Identity merges on the workers: two customer ids found to be one customer become one.

docs/customers.md is the reference (what a merge does, its guarantees, its limits). The pure
parts are in rules/merge.py (combining two states exactly, the terminal changes, the re-grade).

Producers may partition as they like, so nobody can tell which worker holds a customer's state
(as for erasure, streams/erasure.py). Every step of a merge is a record of one topic,
``customer-merges``, an input co-partitioned with the others (partition *p* is consumed by the
worker owning input partition *p*), keyed by the merge id:

1. ``find``: the request, written to partition 0, visits each partition in turn; the owner of
   *p* notes whether it holds INTO's state and FROM's, and changes nothing. Once both are found
   the request goes as ``hand_off`` to FROM's partition; if the last partition is passed without
   both, the merge is ``refused`` (nothing changed).
2. ``hand_off``, at FROM's partition, under the writer lock: FROM's terminal grade changes (grade
   ``none``, direction ``ended``, cause ``merge``) and FROM's state, as ``transfer``, to INTO's
   partition, on the broker first; then FROM's state becomes the merge marker (no facts: INTO's
   id, the merge id, INTO's partition). A crash in between re-does the hand-off from the same
   state; once the marker is there, a hand-off again does nothing.
3. ``transfer``, at INTO's partition, under the writer lock: the facts combined, the merge id
   recorded in INTO's state (a transfer applied twice changes nothing), INTO re-graded with cause
   ``merge``: changes and alerts, then the state, then ``done`` on partition 0.
4. ``event``: an event of FROM read after the hand-off finds the marker (streams/processor.py);
   the batch handler sends it, its ``customer_id`` now INTO and its event id kept, to INTO's
   partition, where it is graded as INTO's (a copy sent twice is a duplicate by its event id).

A record's offset is acknowledged only once its work is on the broker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from rules.engine import CompiledRuleset
from rules.merge import absorb, marker, moving, terminal_changes
from rules.risk import first_look
from rules.state import CustomerState
from schemas.events import CustomerMerge
from streams.faustext.outbox import Outbox
from streams.processor import MERGED_INTERACTIONS, MERGED_TRANSACTIONS, TRANSACTIONS, Record, utcnow
from streams.settings import Settings, merges_topic

log = logging.getLogger("gradeflow.merging")

DONE_MEMORY = 10_000


def request(from_id: str, into_id: str, requested_at: datetime | None = None,
            merge_id: str | None = None) -> CustomerMerge:
    """A merge request, as ``gradeflow customers merge`` writes it to partition 0 (key: the merge id)."""
    return CustomerMerge.model_validate({
        "merge_id": merge_id or str(uuid.uuid4()), "from": from_id, "into": into_id,
        "requested_at": requested_at or datetime.now(timezone.utc), "step": "find"})


def encode(doc: CustomerMerge) -> bytes:
    return doc.model_dump_json(by_alias=True, exclude_none=True).encode()


def forward(outbox: Outbox, topic: str, forwarded: list[tuple[Record, list[Any]]], now: datetime) -> None:
    """Queue on ``outbox`` each event of a merged-away id for the partition of the id it was merged
    into (``BatchResult.forwarded``: the record and the marker's [into_id, merge_id, into_partition])."""
    for record, (into_id, merge_id, into_partition) in forwarded:
        event = orjson.loads(record.value or b"")  # decoded once already: it is an event
        from_id = event["customer_id"]
        event["customer_id"] = into_id
        doc = CustomerMerge.model_validate({
            "merge_id": merge_id, "from": from_id, "into": into_id, "requested_at": now, "step": "event",
            "role": "t" if record.role in (TRANSACTIONS, MERGED_TRANSACTIONS) else "i", "event": event})
        outbox.add(topic, merge_id.encode(), encode(doc), into_partition)


def _held(store: Any, key: bytes, partition: int) -> CustomerState | None:
    if not store.holds(key, partition):
        return None
    raw = store.get_key(key)
    return CustomerState.from_bytes(raw) if raw is not None else None


class Merging:
    """One worker's side of merges: the steps it does for the partitions it owns."""

    def __init__(self, settings: Settings, ruleset: CompiledRuleset, store: Any, clock: Any, population: Any,
                 writer: asyncio.Lock, producer: Callable[[], Any], grader: Any, counters: Any = None) -> None:
        self.settings, self.rs, self.store, self.clock = settings, ruleset, store, clock
        self.population, self.writer, self.producer = population, writer, producer
        self.grader, self.counters = grader, counters
        self.topic = merges_topic(settings)
        self.steps: dict[str, int] = {}
        # (merge id, step, partition) of the steps done here, the latest DONE_MEMORY: a step
        # redelivered after a restart of the consumer (not of the worker) is not passed on again,
        # which would repeat every later step once more (each would change nothing).
        self.done: dict[tuple[str, str, int], None] = {}

    async def step(self, raw: bytes, partition: int, offset: int) -> None:
        """The record ``raw`` read at ``offset`` of partition ``partition`` of the merge topic (owned here)."""
        doc = CustomerMerge.model_validate_json(raw)
        once = (doc.merge_id, doc.step, partition)
        if once in self.done:
            return
        if doc.step == "find":
            await self.find(doc, partition)
        elif doc.step == "hand_off":
            await self.hand_off(doc, partition)
        elif doc.step == "transfer":
            await self.transfer(doc, partition)
        elif doc.step == "event":
            await self.event(doc, partition, offset)
        else:
            return  # an outcome: for `customers merge --wait`
        self.steps[doc.step] = self.steps.get(doc.step, 0) + 1
        if doc.step != "event":  # a merge's events share its id: their replays are told by offset
            self.done[once] = None
            if len(self.done) > DONE_MEMORY:
                del self.done[next(iter(self.done))]

    async def _send(self, outbox: Outbox) -> None:
        if outbox:
            await (await outbox.send(self.producer())).acked()

    async def _outcome(self, doc: CustomerMerge, step: str, reason: str | None = None) -> None:
        outbox = Outbox()
        outcome = doc.model_copy(update={"step": step, "reason": reason, "state": None, "partition": 0})
        outbox.add(self.topic, doc.merge_id.encode(), encode(outcome), 0)
        await self._send(outbox)
        if step == "refused":
            log.warning("gradeflow: merge %s refused: %s", doc.merge_id, reason)
        else:
            log.info("gradeflow: merge %s done", doc.merge_id)

    # ------------------------------------------------------------ find

    async def find(self, doc: CustomerMerge, partition: int) -> None:
        update: dict[str, Any] = {}
        async with self.writer:
            into = _held(self.store, doc.into_id.encode(), partition)
            other = _held(self.store, doc.from_id.encode(), partition)
        if doc.from_id == doc.into_id:
            return await self._outcome(doc, "refused", "an id cannot be merged into itself")
        if into is not None:
            if into.merged_into is not None:
                return await self._outcome(doc, "refused", f"{doc.into_id} was merged into {into.merged_into[0]} "
                                                           f"(merge {into.merged_into[1]}): merge into that one")
            update["into_partition"] = partition
        if other is not None:
            if other.merged_into is not None and other.merged_into[1] != doc.merge_id:
                return await self._outcome(doc, "refused", f"{doc.from_id} was already merged into "
                                                           f"{other.merged_into[0]} (merge {other.merged_into[1]})")
            update["from_partition"] = partition
        doc = doc.model_copy(update=update)
        outbox = Outbox()
        if doc.into_partition is not None and doc.from_partition is not None:
            hand_off = doc.model_copy(update={"step": "hand_off", "partition": doc.from_partition})
            outbox.add(self.topic, doc.merge_id.encode(), encode(hand_off), doc.from_partition)
        elif partition + 1 < self.settings.partitions:
            outbox.add(self.topic, doc.merge_id.encode(), encode(doc.model_copy(update={"partition": partition + 1})),
                       partition + 1)
        else:
            missing = [who for who, at in ((doc.from_id, doc.from_partition), (doc.into_id, doc.into_partition))
                       if at is None]
            return await self._outcome(doc, "refused", f"no state held for {' and '.join(missing)}: "
                                                       f"only customers gradeflow has seen can be merged")
        await self._send(outbox)

    # ------------------------------------------------------------ hand-off (FROM's partition)

    async def hand_off(self, doc: CustomerMerge, partition: int) -> None:
        assert doc.into_partition is not None
        rs, store = self.rs, self.store
        key = doc.from_id.encode()
        async with self.writer:
            other = _held(store, key, partition)
            if other is None:
                refusal = f"{doc.from_id} is no longer held (erased meanwhile?)"
            elif other.merged_into is not None:
                if other.merged_into[1] != doc.merge_id:
                    refusal = f"{doc.from_id} was merged into {other.merged_into[0]} meanwhile"
                elif not moving(other):
                    return  # handed off already: the transfer is on the broker
                else:
                    refusal = None  # cut short after FROM was frozen: done again from the frozen facts
            else:
                refusal = None
            if other is None or refusal is not None:
                return await self._outcome(doc, "refused", refusal)
            if other.merged_into is None:
                # Frozen first: FROM's state as it is, marked as moving to INTO, so that from here
                # on FROM's events go to INTO (the handler forwards them) and a hand-off cut short
                # by a crash is done again from exactly these facts. Were the marker written only
                # after the transfer, an event of FROM graded between a crash and the redo would
                # be applied to FROM after INTO had taken FROM's facts, and be lost to INTO.
                other.merged_into = [doc.into_id, doc.merge_id, doc.into_partition]
                frozen = Outbox()
                store.write_many(frozen, [(key, other.to_bytes(), partition)])
                await store.settle(await frozen.send(self.producer()))
                self._forget(key, partition)
            now = utcnow()
            population = self.population.thresholds if self.population else None
            ends = terminal_changes(doc.from_id, rs, other, doc.into_id, doc.merge_id,
                                    doc.requested_at.timestamp(), now, population)
            outbox = Outbox()
            outbox.extend(self.settings.topics.grade_changes, [(key, orjson.dumps(c)) for c in ends])
            transfer = doc.model_copy(update={"step": "transfer", "partition": doc.into_partition,
                                              "state": other.to_bytes().decode()})
            outbox.add(self.topic, doc.merge_id.encode(), encode(transfer), doc.into_partition)
            # Outputs and the transfer first, durable; then the marker without the facts. A crash in
            # between hands off again, from the frozen state.
            await self._send(outbox)
            store.write_many(outbox, [(key, marker(doc.into_id, doc.merge_id, doc.into_partition).to_bytes(),
                                       partition)])
            await store.settle(await outbox.send(self.producer()))
            self._forget(key, partition)
        if self.counters is not None:
            self.counters.grade_changes += len(ends)

    def _forget(self, key: bytes, partition: int) -> None:
        clock = self.clock
        if clock is None:
            return
        clock.pending.pop(key, None)
        schedule = clock.schedules.get(partition)
        if schedule is not None:
            schedule.set(key, None)

    # ------------------------------------------------------------ transfer (INTO's partition)

    async def transfer(self, doc: CustomerMerge, partition: int) -> None:
        assert doc.state is not None
        rs, store, settings = self.rs, self.store, self.settings
        key = doc.into_id.encode()
        async with self.writer:
            into = _held(store, key, partition)
            if into is None:
                into = CustomerState()  # erased meanwhile: the merged customer starts from FROM's facts
            if into.merged_into is not None:
                # INTO went itself meanwhile: FROM's facts follow it there.
                onward = doc.model_copy(update={"into_id": into.merged_into[0], "into_partition": into.merged_into[2],
                                                "partition": into.merged_into[2]})
                outbox = Outbox()
                outbox.add(self.topic, doc.merge_id.encode(), encode(onward), into.merged_into[2])
                return await self._send(outbox)
            other = CustomerState.from_bytes(doc.state.encode())
            population = self.population.thresholds if self.population else None
            graded = absorb(doc.into_id, rs, into, other, doc.from_id, doc.merge_id, utcnow(), population,
                            settings.allowed_lateness_days)
            if graded is None:
                return await self._outcome(doc, "done")  # applied already; the outcome again is harmless
            changes, alerts = graded
            outbox = Outbox()
            outbox.extend(settings.topics.grade_changes, [(key, orjson.dumps(c)) for c in changes])
            outbox.extend(settings.topics.alerts, [(key, orjson.dumps(a)) for a in alerts])
            await self._send(outbox)
            raw = into.to_bytes()
            store.write_many(outbox, [(key, raw, partition)])
            await store.settle(await outbox.send(self.producer()))
            clock = self.clock
            if clock is not None and clock.look_horizon is not None:
                look = first_look(rs, into, clock.look_horizon, population)
                clock.note({doc.into_id: (into.last_event_ts, look)},
                           {doc.into_id: (raw, Record("m", self.topic, partition, 0, key, None))})
        if self.counters is not None:
            self.counters.grade_changes += len(changes)
            self.counters.alerts += len(alerts)
        await self._outcome(doc, "done")

    # ------------------------------------------------------------ FROM's later events

    async def event(self, doc: CustomerMerge, partition: int, offset: int) -> None:
        role = MERGED_TRANSACTIONS if doc.role == "t" else MERGED_INTERACTIONS
        record = Record(role, self.topic, partition, offset, doc.into_id.encode(), orjson.dumps(doc.event))
        result, written = await self.grader.grade([record])
        if written is not None:
            await self.store.settle(written)
        c = self.counters
        if c is not None:
            c.consumed += result.consumed
            c.applied += result.applied
            c.duplicates += result.duplicates
            c.replayed += result.replayed
            c.dead_lettered += result.dead
            c.refused += result.refused
            c.forwarded += len(result.forwarded)
            c.grade_changes += len(result.grade_changes)
            c.alerts += len(result.alerts)


def attach_merging(app: Any, settings: Settings, ruleset: CompiledRuleset, store: Any, clock: Any, population: Any,
                   writer: asyncio.Lock, grader: Any) -> Merging | None:
    """Do the merge steps of the partitions this worker owns (GRADEFLOW_CUSTOMER_MERGES on), else None."""
    if not settings.customer_merges:
        return None
    merging = Merging(settings, ruleset, store, clock, population, writer, grader.producer,
                      grader, getattr(app, "gradeflow_counters", None))
    app.gradeflow_merging = merging
    grader.merges_topic = merging.topic
    topic = app.topic(merging.topic, key_type=bytes, value_type=bytes)
    erasure = getattr(app, "gradeflow_erasure", None)

    @app.agent(topic, name="customer-merges")
    async def _steps(stream: Any) -> None:
        async for event in stream.events():
            if erasure is not None:
                await erasure.ready.wait()  # FROM's forwarded events are graded as events are
            m = event.message
            try:
                CustomerMerge.model_validate_json(m.value or b"")
            except ValueError as exc:  # pydantic's ValidationError is one; its text would repeat the record
                log.warning("gradeflow: skipping a record on %s that is not a merge step (%s)",
                            merging.topic, type(exc).__name__)
                continue
            while True:
                try:
                    await merging.step(m.value, m.partition, m.offset)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - broker away: the step is re-done, never skipped
                    log.exception("gradeflow: a merge step failed; retrying in 2 s")
                    await asyncio.sleep(2)

    return merging
