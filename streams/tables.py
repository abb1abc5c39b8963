"""Customer state on a Faust table, behind the small StateReader protocol."""

from __future__ import annotations

import weakref
from typing import Any

from faust import streams as faust_streams
from faust.stores.memory import Store as MemoryStore

from streams.outbox import Outbox
from streams.processor import Record


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
