"""Batch delivery of the input topics, inside Faust's own consumer.

Faust hands records to agents one at a time: each record becomes a Message and
an Event, crosses two coroutine hand-offs and an asyncio queue, and the
consumer's drain loop wraps every record in ``wait_first`` (two tasks).
Measured here, that machinery alone capped a worker at a few thousand
records/s, about a hundredth of what the broker delivers, before any grading.

:class:`BatchConsumer` keeps everything else Faust does (group membership,
rebalancing, table recovery from changelogs, offset commits with gap
tracking, flow control while tables recover, the stream-health checks) and
changes one thing: the records of the topics registered with
:func:`deliver_in_batches` are handed, as the raw aiokafka records of one
fetch, to one coroutine; records of every other topic (Faust's own, the
downstream agents') take Faust's normal path. The handler calls
:meth:`BatchConsumer.ack_records` once their effects are durable; Faust then
commits those offsets as it does for agents, and a rebalance waits for the
batch in flight (``wait_empty``) as it waits for agents.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from time import monotonic
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.tuples import ack_lock
from mode import Service
from mode.utils.futures import notify

from streams.faustext.recovery import bulk_recovery

# A handler grades a batch and returns what remains to settle it (waiting for
# its state on the changelog, then acking): the consumer runs that while the
# next batch is graded, at most one batch behind.
BatchHandler = Callable[[list[Any]], Awaitable[Awaitable[None] | None]]


class _InFlight:
    """Stands in Faust's set of unacked messages while a batch is processed."""

    __slots__ = ("acked", "refcount", "__weakref__")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1


class BatchConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the app's ``fetch_max_wait_ms``.

    Faust builds the worker's aiokafka consumer with ``fetch_max_wait_ms=1500``.
    aiokafka keeps one fetch in flight per broker and does not fetch a partition
    whose records are still buffered, so while the input partitions' records are
    graded it sends a fetch for the rest alone (the idle ``interactions``
    partitions, the assignor's): the broker holds that one for the whole wait, and
    input partitions drained meanwhile cannot be fetched until it returns. Two
    workers spent half their time there (docs/performance.md, "Fetch wait and idle partitions").
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait = cast(BatchingApp, self.app).fetch_max_wait_ms
        if wait is not None:
            # Read by AIOKafkaConsumer.start(), which builds the fetcher; there is no public
            # setter and Faust passes a constant (tests/streams/faustext/test_batching_fetch.py guards this).
            consumer._fetch_max_wait_ms = wait
        if getattr(self.app, "read_committed", False):
            # Exactly-once (streams/faustext/transactions.py), without Faust's own exactly-once mode,
            # which would set this: inputs, changelogs (recovery) and the downstream agents' topics
            # read without aborted records or those of open transactions. Read by
            # AIOKafkaConsumer.start(), as above.
            consumer._isolation_level = "read_committed"
        return consumer


class BatchConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer with a batch path for selected topics."""

    #: Changelog records applied a fetch at a time while recovering (streams/faustext/recovery.py).
    bulk_recovered = 0

    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack_records(self, records: Sequence[Any]) -> None:
        """Mark processed records as acked, so that Faust commits past them."""
        by_tp: dict[Any, list[int]] = {}
        for r in records:
            by_tp.setdefault((r.topic, r.partition), []).append(r.offset)
        acks_enabled_for = self.app.topics.acks_enabled_for
        with ack_lock:
            for (topic, partition), offsets in by_tp.items():
                if not acks_enabled_for(topic):
                    continue
                tp = TP(topic, partition)
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                fresh = [o for o in offsets if (committed is None or o >= committed) and o not in index]
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
            notify(self._waiting_for_ack)

    async def _unread(self, tp: TP, records: Sequence[Any]) -> None:
        """Put back ``records`` (a fetch's records of ``tp``, in order), fetched but not delivered
        (docs/guarantees.md, "Across a rebalance")."""
        if not records:
            return
        first, after = records[0].offset, records[-1].offset + 1
        thread = self._thread

        async def in_thread() -> bool:  # aiokafka runs in Faust's consumer thread
            return put_back(thread._ensure_consumer(), tp, first, after)

        try:
            moved = await thread.call_thread(in_thread)
        except Exception as exc:  # noqa: BLE001 - the drain loop must live on (a consumer stopping)
            self.log.warning("gradeflow: could not put back records of %s:%d: %r", tp.topic, tp.partition, exc)
            return
        if moved:
            self.log.info("gradeflow: %d records of %s:%d fetched during a rebalance are read again from %d",
                          len(records), tp.topic, tp.partition, first)

    async def _seek_back(self) -> None:
        """Seek every partition back to its committed offset (the input partitions: changelogs
        have none), so that the records of a dropped fetch are fetched again."""
        try:
            await self.perform_seek()
        except Exception as exc:  # noqa: BLE001 - as Faust's getmany: the drain loop must live on
            # Nothing is assigned right now: a rebalance is under way, and its recovery ends
            # with the same seek.
            self.log.warning("gradeflow: seek to the committed offsets failed: %r", exc)

    async def _refetch_inputs(self, records_by_tp: Any, batch_topics: frozenset[str]) -> None:
        """After a fetch's input records were dropped, have them fetched again: every partition back
        to its committed offset, then each input partition the seek left where the fetch took it
        (one with no committed offset yet: a new group, or an owner killed before its first
        commit) back to the first record dropped. Without the second step a takeover of such a
        partition skipped the records of its first fetch and waited past them for good."""
        await self._seek_back()
        for tp, records in records_by_tp.items():
            if tp.topic in batch_topics:
                await self._unread(tp, records)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by broker tests
        handler: BatchHandler | None = getattr(self.app, "_gradeflow_batch_handler", None)
        batch_topics: frozenset[str] = getattr(self.app, "_gradeflow_batch_topics", frozenset())
        if handler is None:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        consumer_stopped = cast(Service, self)._stopped.is_set
        fetcher_stopped = cast(Service, fetcher)._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        unacked = self._unacked_messages
        monitor = self.app.monitor
        settling: asyncio.Future[None] | None = None
        # Exactly-once (streams/faustext/transactions.py): ends the recovery of changelogs that end
        # with a transaction marker, once what was fetched is applied or queued.
        after_delivery: Callable[[Any], bool] | None = getattr(self.app, "gradeflow_after_delivery", None)
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                await self.sleep(0)
                if self.should_stop:
                    break
                if after_delivery is not None and after_delivery(self._thread._ensure_consumer()):
                    self.log.info("gradeflow: tables recovered (changelogs read up to their last transaction marker)")
                generation = self.app.consumer_generation_id
                records_by_tp, active = await self._wait_next_records(1.0)
                if not records_by_tp or self.should_stop:
                    continue
                if not self.flow_active:
                    # A rebalance is under way: drop the fetch and rewind, as Faust does; nothing here
                    # was acked. The changelog records are put back: the recovery may have set their
                    # positions already, and its seek will not come again.
                    for tp, records in records_by_tp.items():
                        if tp.topic not in batch_topics:
                            await self._unread(tp, records)
                    await self._refetch_inputs(records_by_tp, batch_topics)
                    continue
                # The records of the batch topics in a fetch that spans a rebalance are dropped before
                # they move any read offset, every partition is sought back to its committed
                # offset, and an input partition that seek left past them (no committed offset yet)
                # is put back to them (:meth:`_refetch_inputs`): whether they came before or after
                # the rebalance's own seek, they are fetched again. (Moving the read offset past that seek made the consumer skip records
                # as "delivered before a seek"; dropping them without a seek of our own lost those
                # fetched after it.) Every other record, the tables' changelogs above all, is delivered
                # as Faust delivers it: the new generation's recovery may be reading those, from the
                # positions it set; one that is not delivered is put back (:meth:`_unread`).
                spanned = self.app.consumer_generation_id != generation
                generation = self.app.consumer_generation_id
                batch: list[Any] = []
                stale = dropped = False
                now = monotonic()
                for tp, records in records_by_tp.items():
                    mine = tp.topic in batch_topics
                    paused = active is not None and tp not in active and tp not in self._buffered_partitions
                    if stale or paused or (mine and spanned):
                        # Not taken now: a rebalance came during delivery (stale), the partition was
                        # paused since the fetch (a rebalance pauses the input until the tables are
                        # recovered), or input records of a fetch that spans a rebalance. The fetch has
                        # moved the position past them all the same: input records are fetched again
                        # after the seek below (else they came back only after the next fetch's
                        # records, graded ahead of them); the others are put back.
                        if mine:
                            dropped = True
                        else:
                            await self._unread(tp, records)
                        continue
                    if monitor is not None:
                        monitor.track_tp_end_offset(tp, self.highwater(tp))
                        monitor.stream_inbound_time[tp] = now
                    last = read_offset[tp]
                    if not mine and not acks_enabled_for(tp.topic):
                        bulk = bulk_recovery(self.app, tp)
                        if bulk is not None:
                            # A changelog partition Faust's recovery is reading: one apply for the
                            # fetch instead of a Message, an Event and three tasks per record
                            # (streams/faustext/recovery.py). Synchronous: no rebalance comes in between.
                            fresh = records if last is None else [r for r in records if r.offset >= last]
                            if fresh:
                                read_offset[tp] = fresh[-1].offset
                                self.bulk_recovered += len(fresh)
                                if bulk(fresh):
                                    self.log.info("gradeflow: tables recovered; %d changelog records applied "
                                                  "a fetch at a time since the worker started", self.bulk_recovered)
                            continue
                    for i, record in enumerate(records):
                        offset = record.offset
                        if last is not None and offset < last:
                            continue  # delivered before a seek
                        if last is not None and offset - last > 1 and acks_enabled_for(tp.topic):
                            # Compaction and transaction markers leave holes;
                            # Faust must know them or commits stop advancing.
                            await self._add_gap(tp, last + 1, offset)
                        if not mine:
                            message = self._to_message(tp, record)
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        if self.app.consumer_generation_id != generation:
                            stale = True  # a rebalance came during an await above
                            if not mine:
                                await self._unread(tp, records[i + 1:])
                            break
                        last = offset
                        if mine:
                            batch.append(record)
                    if not stale:
                        read_offset[tp] = last
                if stale or dropped:
                    await self._refetch_inputs(records_by_tp, batch_topics)
                    continue
                if not batch:
                    continue
                marker = _InFlight()
                unacked.add(marker)  # type: ignore[arg-type]
                try:
                    tail = await handler(batch)
                except BaseException:
                    _release(marker, unacked)
                    raise
                if settling is not None:
                    await settling  # at most one batch settles behind the one being graded
                    settling = None
                if tail is None:
                    _release(marker, unacked)
                else:
                    settling = asyncio.ensure_future(tail)
                    settling.add_done_callback(functools.partial(_after_settle, marker, unacked))
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
            if settling is not None:
                await settling
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


def put_back(consumer: Any, tp: Any, first: int, after: int) -> bool:
    """Seek ``tp`` back to ``first`` if ``consumer`` (an ``AIOKafkaConsumer``) still stands at
    ``after``, right past the records a fetch returned; True if it did.

    A seek since the fetch (a recovery's, a rebalance's) has already said where to read from,
    and wins.
    """
    subscription = consumer._subscription.subscription
    state = subscription.assignment.state_value(tp) if subscription is not None else None
    if state is None or not state.has_valid_position or state.position != after:
        return False
    consumer.seek(tp, first)
    return True


def _after_settle(marker: _InFlight, unacked: Any, _settled: asyncio.Future[Any]) -> None:
    _release(marker, unacked)


def _release(marker: _InFlight, unacked: Any) -> None:
    marker.acked = True
    unacked.discard(marker)


class BatchTransport(aiokafka_driver.Transport):
    """The aiokafka transport, with :class:`BatchConsumer`."""

    Consumer = BatchConsumer


class BatchingApp(faust.App):
    """A Faust app whose consumer can deliver chosen topics in batches."""

    #: The worker consumer's fetch.max.wait.ms (see :class:`BatchConsumerThread`); None: Faust's.
    fetch_max_wait_ms: int | None = None
    #: The worker consumer reads with isolation.level=read_committed (exactly-once).
    read_committed: bool = False

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)

    async def _on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        # Exactly-once (streams/faustext/transactions.py): each assigned input partition's
        # transactional producer fences its previous owner before Faust's recovery, which reads
        # the changelogs up to their last stable offset and ends with the seek to the committed
        # offsets, starts.
        before: Callable[[Any], Awaitable[None]] | None = getattr(self, "gradeflow_before_assign", None)
        if before is not None:
            try:
                await before(assigned)
            except Exception as exc:  # noqa: BLE001 - as Faust's own rebalance errors: the worker stops
                self.log.error("gradeflow: could not take over the transactional ids of %s: %r", assigned, exc)
                await self.crash(exc)
                return
        await super()._on_partitions_assigned(assigned, generation_id)


def deliver_in_batches(app: BatchingApp, topic: Any, handler: BatchHandler) -> None:
    """Subscribe ``app`` to ``topic`` and hand its records to ``handler`` a fetch at a time.

    The handler gets aiokafka ``ConsumerRecord`` objects (``topic``,
    ``partition``, ``offset``, ``key``, ``value``, ``timestamp`` in ms) and
    must call ``app.consumer.ack_records(records)`` once their effects are durable.
    """
    app.topics.add(topic)
    app._gradeflow_batch_handler = handler  # type: ignore[attr-defined]
    app._gradeflow_batch_topics = frozenset(topic.topics)  # type: ignore[attr-defined]
