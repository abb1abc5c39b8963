"""Exactly-once processing (``GRADEFLOW_PROCESSING_GUARANTEE=exactly_once``): one Kafka
transaction per input partition and step.

A batch's records of input partition ``p``, their outputs (dead letters, grade changes, alerts),
the states they change on the changelog (with ``p``'s stream-time marker, streams/clock.py) and
the offsets consumed on both input topics' partition ``p`` are written in one transaction of the
producer whose transactional id is ``<app id>-eos-<p>``: all become visible to ``read_committed``
consumers, or none. The transaction also moves the partition's input watermark, a key of the
table's own (:func:`offsets_key`), past the records it graded: what a seek fetches again below it
is skipped (:meth:`PartitionProducers.ungraded`). A wake of the clock and a chunk of the rules
sweep write their outputs and states the same way, per partition, without offsets.

Why one producer per input partition (docs/guarantees.md, "Exactly once"): aiokafka 0.14's
``send_offsets_to_transaction`` sends ``TxnOffsetCommit`` with the group id only (no generation,
no member id), so the group coordinator cannot refuse the offsets of a worker that lost its
partitions (per-worker fencing, KIP-447, is not available). The transactional id fences instead:
it belongs to the input partition, so the worker that takes ``p`` over initialises the same id
before it recovers ``p``'s state or reads its committed offset, which bumps the id's epoch and
aborts the previous owner's open transaction. The previous owner's next send, offset commit or
commit is refused (``ProducerFenced``); it then stops (:meth:`PartitionProducers.fail`), since
its table holds states of a transaction that never committed.

This module reaches into aiokafka's consumer (positions) and Faust's recovery (offsets read):
it belongs with the other extensions checked against the tested releases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streams.faustext.outbox import MAX_BATCH_BYTES
from streams.faustext.recovery import _signal_progress
from streams.faustext.tables import RESERVED
from streams.kafka_config import bootstrap_list

log = logging.getLogger("gradeflow.transactions")

_INPUT_OFFSETS = RESERVED + b"input-offsets/"

#: Error class names aiokafka raises once another producer initialised the same transactional id.
FENCED = ("ProducerFenced", "InvalidProducerEpoch")


class TransactionFailed(RuntimeError):
    """A transaction of an input partition could not be committed: the worker stops."""


@dataclass
class TransactionStats:
    committed: int = 0
    aborted: int = 0
    fenced: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"committed": self.committed, "aborted": self.aborted, "fenced": self.fenced}


def transactional_id(group_id: str, partition: int) -> str:
    """The transactional id of input partition ``partition``: used by whichever worker owns it."""
    return f"{group_id}-eos-{partition}"


def offsets_key(partition: int) -> bytes:
    """The state table's key of input partition ``partition``'s input watermark (on that partition's
    changelog): per input topic, the offset after the last record graded, as JSON."""
    return _INPUT_OFFSETS + str(partition).encode()


def decode_offsets(raw: bytes | None) -> dict[str, int]:
    return {} if raw is None else dict(orjson.loads(raw))


def input_offsets(records: Iterable[Any]) -> dict[TopicPartition, int]:
    """The offsets to commit after ``records`` (anything with ``topic``, ``partition`` and
    ``offset``): per topic partition, the last offset read plus one."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        after = r.offset + 1
        if out.get(tp, -1) < after:
            out[tp] = after
    return out


class PartitionProducers:
    """The worker's transactional producers, one per input partition it owns.

    A producer is started (``InitProducerId``: the fencing of any previous owner) as its partition is
    assigned, before Faust's recovery reads the partition's changelog and committed offset, and
    stopped as it is revoked. Only :meth:`assign` starts one: a worker that lost a partition must
    never initialise its id again, which would fence the partition's new owner. At most one
    transaction per partition is open at a time: :meth:`begin` waits for the previous one's commit.
    """

    def __init__(self, app: Any, settings: Any, new_producer: Callable[[int], AIOKafkaProducer] | None = None) -> None:
        self.app, self.settings = app, settings
        self.enabled = settings.processing_guarantee == "exactly_once"
        self.group_id: str = settings.group_id
        self._new_producer = new_producer or self._default_producer
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._commits: dict[int, asyncio.Future[None]] = {}
        self.stats = TransactionStats()
        self.failed: TransactionFailed | None = None

    # ------------------------------------------------------------ producers

    def _default_producer(self, partition: int) -> AIOKafkaProducer:
        conf = self.app.conf
        auth = credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context)
        return AIOKafkaProducer(
            bootstrap_servers=bootstrap_list(self.settings),
            client_id=self.settings.kafka_client_id,
            transactional_id=transactional_id(self.group_id, partition),
            enable_idempotence=True,
            acks="all",
            max_batch_size=MAX_BATCH_BYTES,
            **auth,
        )

    async def _start(self, partition: int) -> None:
        producer = self._new_producer(partition)
        try:
            await producer.start()  # InitProducerId: fences the previous owner of this id
        except BaseException:
            await producer.stop()
            raise
        self._producers[partition] = producer

    def owned(self) -> set[int]:
        """The input partitions whose producers are started."""
        return set(self._producers)

    async def assign(self, partitions: Iterable[int]) -> None:
        """Start the producers of ``partitions`` not started yet (fencing their previous owners)."""
        if self.enabled:
            if self.failed is not None:
                # A worker stopping after a failed transaction must take no id over: that would
                # fence the producers of a worker that did nothing wrong.
                raise TransactionFailed("an earlier transaction failed; the worker is stopping") from self.failed
            todo = sorted(set(partitions) - self._producers.keys())
            await asyncio.gather(*(self._start(p) for p in todo))
            log.info("gradeflow: input partitions %s assigned, their transactional ids taken over",
                     sorted(self._producers))

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Let the open commits of ``partitions`` end, then stop their producers: the next owner
        fences the id, and this worker starts a new producer if the partition comes back."""
        gone = sorted(set(partitions) & (self._producers.keys() | self._commits.keys()))
        for p in gone:
            pending = self._commits.pop(p, None)
            if pending is not None:
                await asyncio.wait([pending])
            producer = self._producers.pop(p, None)
            if producer is not None:
                await producer.stop()
        if gone:
            log.info("gradeflow: input partitions %s revoked, their transactions ended (%s)", gone,
                     self.stats.as_dict())

    async def stop(self) -> None:
        await self.revoke(list(self._producers))

    # ------------------------------------------------------------ what was graded

    def ungraded(self, records: list[Any], store: Any) -> list[Any]:
        """``records`` (of one input partition) less those at or before the partition's input
        watermark in the table (``store``, see :func:`offsets_key`): already graded in a
        committed transaction, or in one of this worker's own still committing.

        The consumer's committed offsets cannot say this alone: a seek to them (a fetch dropped
        around a rebalance, a record put back) may run while a transaction that holds later
        offsets is being completed, and the group coordinator then still returns the offset from
        before it. A customer's state would count such a record as replayed, but a record without
        state (a dead letter) would be published twice, and the offsets committed would go back."""
        if not records:
            return records
        watermark = decode_offsets(store.get_key(offsets_key(records[0].partition)))
        fresh = [r for r in records if r.offset >= watermark.get(r.topic, -1)]
        if len(fresh) < len(records):
            log.info("gradeflow: %d records of input partition %d fetched again after a seek were graded "
                     "before: skipped", len(records) - len(fresh), records[0].partition)
        return fresh

    def graded(self, records: list[Any], store: Any) -> list[tuple[bytes, bytes, int]]:
        """The table write that moves the input watermark of ``records``' partition past them,
        to go in the transaction that grades them."""
        partition = records[0].partition
        key = offsets_key(partition)
        watermark = decode_offsets(store.get_key(key))
        for tp, after in input_offsets(records).items():
            if after > watermark.get(tp.topic, -1):
                watermark[tp.topic] = after
        return [(key, orjson.dumps(watermark), partition)]

    # ------------------------------------------------------------ transactions

    async def begin(self, partition: int) -> AIOKafkaProducer | None:
        """Open a transaction on ``partition``'s producer, once its previous one is committed; None
        when this worker does not own ``partition`` (revoked since its records were fetched)."""
        if self.failed is not None:
            raise TransactionFailed("an earlier transaction failed; the worker is stopping") from self.failed
        pending = self._commits.pop(partition, None)
        if pending is not None:
            await pending
        producer = self._producers.get(partition)
        if producer is None:
            return None
        try:
            await producer.begin_transaction()
        except Exception as exc:  # noqa: BLE001 - any error here ends the worker (fail)
            raise await self.fail(partition, producer, exc) from exc
        return producer

    async def commit(self, partition: int, producer: AIOKafkaProducer,
                     offsets: dict[TopicPartition, int] | None = None) -> None:
        """Add ``offsets`` (input offsets consumed) to the open transaction and commit it."""
        try:
            if offsets:
                await producer.send_offsets_to_transaction(offsets, self.group_id)
            await producer.commit_transaction()
        except Exception as exc:  # noqa: BLE001 - any error here ends the worker (fail)
            raise await self.fail(partition, producer, exc) from exc
        self.stats.committed += 1

    def commit_soon(self, partition: int, producer: AIOKafkaProducer,
                    offsets: dict[TopicPartition, int] | None = None) -> asyncio.Future[None]:
        """:meth:`commit` in the background; the partition's next :meth:`begin` and its revocation
        wait for it."""
        task = asyncio.ensure_future(self.commit(partition, producer, offsets))
        # A failure is handled in commit (the worker stops); whoever awaits the task sees it too.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._commits[partition] = task
        return task

    async def fail(self, partition: int, producer: AIOKafkaProducer, exc: BaseException) -> TransactionFailed:
        """Abort what can be aborted and stop the worker: its table holds the states of a
        transaction that did not commit, so only a restart (recovering the committed changelog)
        may grade again. Returns the error to raise."""
        name = type(exc).__name__
        fenced = name in FENCED
        if fenced:
            self.stats.fenced += 1
            log.error("gradeflow: the producer of input partition %d is fenced (%s): another worker owns the "
                      "partition; this worker stops without committing", partition, name)
        else:
            log.error("gradeflow: the transaction of input partition %d failed (%s: %s); this worker stops",
                      partition, name, exc)
            try:
                await producer.abort_transaction()
                self.stats.aborted += 1
            except Exception:  # noqa: BLE001, S110 - the broker aborts it at the transaction timeout
                pass
        error = TransactionFailed(f"transaction of input partition {partition}: {name}")
        if self.failed is None:
            self.failed = error
            crash = getattr(self.app, "crash", None)
            if crash is not None:
                asyncio.ensure_future(crash(error))
        return error

    @asynccontextmanager
    async def step(self, partition: int) -> AsyncIterator[AIOKafkaProducer | None]:
        """A producer for one step of a writer beside the batch handler (a wake of the clock, a chunk
        of the rules sweep) on ``partition``: a transaction committed when the block ends (the
        worker stops if it raises); None when this worker does not own ``partition``."""
        producer = await self.begin(partition)
        if producer is None:
            yield None
            return
        try:
            yield producer
        except BaseException as exc:
            raise await self.fail(partition, producer, exc) from exc
        await self.commit(partition, producer)


def attach_transactions(app: Any, settings: Any, writer: asyncio.Lock) -> PartitionProducers:
    """The worker's :class:`PartitionProducers`, started and stopped with its input partitions.

    ``writer`` is the worker's writer lock (streams/clock.py): a revocation waits for the step
    that holds it, so no batch, wake or sweep step is left with a stopped producer."""
    producers = PartitionProducers(app, settings)
    app.gradeflow_transactions = producers
    if not producers.enabled:
        return producers
    inputs = settings.topics.transactions

    async def before_assign(assigned: Iterable[Any]) -> None:
        # Called before Faust starts the recovery that reads the changelogs up to their last stable
        # offset and ends with the seek to the committed offsets (streams/faustext/batching.py):
        # fencing first, so no previous owner commits anything past what is read.
        await producers.assign(tp.partition for tp in assigned if tp.topic == inputs)

    app.gradeflow_before_assign = before_assign

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any = None, revoked: Iterable[Any] = (), **kwargs: Any) -> None:
        async with writer:
            await producers.revoke(tp.partition for tp in revoked if tp.topic == inputs)

    @app.on_before_shutdown.connect
    async def _shutdown(sender: Any = None, **kwargs: Any) -> None:
        # Commits under way end (or fail) before the worker leaves; open transactions of a worker
        # that dies instead are aborted by the next owner's fencing.
        await producers.stop()

    app.gradeflow_after_delivery = lambda consumer: past_markers(app, consumer)
    return producers


def _position(consumer: Any, tp: Any) -> int | None:
    subscription = consumer._subscription.subscription
    state = subscription.assignment.state_value(tp) if subscription is not None else None
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def past_markers(app: Any, consumer: Any) -> bool:
    """Count a changelog partition as recovered once the consumer (an ``AIOKafkaConsumer``) has
    delivered everything up to its end; True if that ended the recovery.

    Called by the drain loop once a fetch's records are all applied or queued (never between the
    fetch and their delivery: the position is already past them then). With ``read_committed``
    the end offset Faust's recovery reads is the last stable offset, and a changelog written in
    transactions ends with a commit marker: its last record is two before that end, so Faust's
    recovery, which waits for a record at the end minus one, would wait for one that never comes.
    The consumer's position moves past markers and aborted records: at or past the end, all is read.
    """
    tables = app.tables
    recovery = getattr(tables, "recovery", None)
    if recovery is None or not tables.changelog_queue.empty():
        return False  # records still on their way to the table: Faust's path counts them first
    if any(recovery.buffers.values()) and not recovery.in_recovery:
        return False
    moved = False
    for highwaters, offsets in ((recovery.active_highwaters, recovery.active_offsets),
                                (recovery.standby_highwaters, recovery.standby_offsets)):
        for tp, highwater in list(highwaters.items()):
            if highwater is None or highwater < 0:
                continue
            read = offsets.get(tp)
            if read is not None and read >= highwater:
                continue
            position = _position(consumer, tp)
            # Faust's highwater is the end offset minus one.
            if position is not None and position > highwater:
                offsets[tp] = highwater
                moved = True
    if not moved or not (recovery.in_recovery or recovery.standby_tps):
        return False
    return _signal_progress(recovery)
