"""Customer state on a Faust table, behind the small StateReader protocol.

Two things Faust 0.15.3 does not do for a table written the way gradeflow writes it:

* **Persisted offsets of our own writes.** Faust records, per changelog
  partition, the offset a store holds data up to (``set_persisted_offset``)
  in the callback of ``table[key] = value``; recovery then reads only what
  follows. gradeflow writes the changelog directly (:class:`FaustStateStore`),
  so it records them itself once the broker has the records
  (:meth:`FaustStateStore.mark_written`). Without that a RocksDB worker
  restarted on its own volume re-read every changelog from the beginning.
* **Offsets in memory.** Faust's memory store says it holds nothing
  (``persisted_offset`` is always None) and, after each recovery, drops the
  keys of every partition that is not active, standby copies included; so a
  standby never shortened a failover and every rebalance re-read the whole
  changelog of every partition. :class:`OffsetMemoryStore` keeps, for the
  life of the process, the offset up to which it has read each partition,
  and keeps standby partitions' keys.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence, Set
from typing import Any

from faust import stores as faust_stores
from faust import streams as faust_streams
from faust.stores.memory import Store as MemoryStore
from faust.types import TP

from streams.outbox import Outbox
from streams.processor import Record

# The store URL scheme of OffsetMemoryStore; GRADEFLOW_STORE=memory:// selects it (streams/app.py).
MEMORY_SCHEME = "gradeflow-memory"


class OffsetMemoryStore(MemoryStore):
    """Faust's memory store, knowing how far it has read each changelog partition.

    The offsets live as long as the data does: a new process starts empty and
    reads every changelog from the beginning, as before; a partition this
    worker keeps across a rebalance is read again from where its last reading
    ended (for a standby copy, which only reads, that is the tail). Keys and
    offsets of partitions the worker no longer holds are dropped after each
    recovery, so that a partition that comes back is read from the beginning.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._offsets: dict[TP, int] = {}

    def persisted_offset(self, tp: TP) -> int | None:
        """The last changelog offset of ``tp`` whose record this store holds, or None."""
        return self._offsets.get(TP(tp.topic, tp.partition))

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Ignored: only what this store read from the changelog moves its offsets.

        A worker's own writes are in memory already, but so may be, below their offsets, records
        another worker appended to the same partition around a rebalance (a slow member still
        finishing a batch after its partitions moved). Reading again from the last offset read,
        as Faust's memory store effectively does from the beginning, replays those in order;
        trusting the offsets of our own writes would skip them (the fault suite's 2→3 workers
        test caught a customer graded on such a state).
        """

    def _create_batch_iterator(self, mark_as_delete: Callable[[Any], None], to_key: Callable[[Any], Any],
                               to_value: Callable[[Any], Any], batch: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
        offsets = self._offsets
        key_partition = self._key_partition
        for event in batch:
            message = event.message
            key = to_key(event.key)
            if message.value is None:
                mark_as_delete(key)
            key_partition[key] = message.partition
            tp = message.tp
            if message.offset > offsets.get(tp, -1):
                offsets[tp] = message.offset
            yield key, to_value(event.value)

    async def on_recovery_completed(self, active_tps: Set[TP], standby_tps: Set[TP]) -> None:
        """Drop the keys and offsets of partitions that are neither active nor standby here."""
        held = {tp.partition for tp in active_tps} | {tp.partition for tp in standby_tps}
        gone = [key for key, partition in self._key_partition.items() if partition not in held]
        for key in gone:
            self.data.pop(key, None)
            self._key_partition.pop(key, None)
        for tp in [tp for tp in self._offsets if tp.partition not in held]:
            del self._offsets[tp]


faust_stores.STORES.aliases.setdefault(MEMORY_SCHEME, f"{__name__}:OffsetMemoryStore")


def store_url(configured: str) -> str:
    """The Faust store URL for ``GRADEFLOW_STORE``: ``memory://`` means :class:`OffsetMemoryStore`."""
    if configured.split(":", 1)[0] == "memory":
        return f"{MEMORY_SCHEME}://"
    return configured


class _PartitionOnly:
    """The part of a Faust event a table store reads: ``event.message.partition``."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, message: Any) -> None:
        self.message = message


class FaustStateStore:
    """Reads and batched writes of customer state on a Faust table of raw bytes.

    Faust's ``table[key] = value`` sends each change to the changelog through a
    buffer drained one message per event-loop turn, to the partition of the
    *current event*. Here a batch writes each touched customer once, straight
    to the producer, to the changelog partition of the customer's own input
    record, so that recovery after a rebalance restores every customer on
    the partition its events arrive on.
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def _memory(self) -> dict[bytes, Any] | None:
        """The memory store's dict, or None for stores that need Faust's own access path."""
        data = self.table.data
        return data.data if isinstance(data, MemoryStore) else None

    def get(self, customer_id: str) -> bytes | None:
        memory = self._memory()
        if memory is not None:
            # A plain dict lookup: Faust's Mapping.get costs three Python calls per customer.
            return memory.get(customer_id.encode())
        return self.table.get(customer_id.encode())

    def mark_written(self, results: Sequence[Any], counts: Sequence[int]) -> None:
        """Record how far the changelog holds this store's writes, once the broker acknowledged them.

        ``results`` are the record batches' metadata (``Outbox.send`` futures' results: the base
        offset of each batch) and ``counts`` their record counts (``Outbox.counts``)."""
        data = self.table.data
        for metadata, count in zip(results, counts):
            if metadata is not None:
                data.set_persisted_offset(TP(metadata.topic, metadata.partition), metadata.offset + count - 1)

    def write_many(self, outbox: Outbox, states: dict[str, tuple[bytes, Record]]) -> None:
        """Store every state and queue it for the changelog partition of its input record."""
        table = self.table
        changelog = table.changelog_topic.get_topic_name()
        memory = self._memory()
        if memory is not None:
            # Faust's memory store drops, after a rebalance, the keys of partitions the
            # worker no longer owns, by the partition it saw each key on.
            key_partition = table.data._key_partition
            for customer_id, (raw, record) in states.items():
                key = customer_id.encode()
                # orjson's output keeps a 4 KiB allocation whatever its length;
                # a right-sized copy is what the table holds for a long time.
                memory[key] = bytes(memoryview(raw))
                key_partition[key] = record.partition
                outbox.add(changelog, key, raw, record.partition)
            return
        data = table.data
        var = faust_streams._current_event
        previous = var.get(None)
        try:
            for customer_id, (raw, record) in states.items():
                key = customer_id.encode()
                # Stores that keep one database per partition (RocksDB) find
                # it through the current event.
                shim = _PartitionOnly(record.origin)
                var.set(weakref.ref(shim))
                data[key] = bytes(memoryview(raw))
                outbox.add(changelog, key, raw, record.partition)
        finally:
            var.set(previous)
