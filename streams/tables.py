"""Customer state on a Faust table, behind the small StateReader protocol."""

from __future__ import annotations

import weakref
from typing import Any

from faust import streams as faust_streams

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

    def get(self, customer_id: str) -> bytes | None:
        return self.table.get(customer_id.encode())

    async def write_many(self, producer: Any, states: dict[str, tuple[bytes, Record]]) -> list[Any]:
        """Store every state and send it to the changelog; return the send futures."""
        table = self.table
        data = table.data
        changelog = table.changelog_topic.get_topic_name()
        var = faust_streams._current_event
        previous = var.get(None)
        futures = []
        try:
            for customer_id, (raw, record) in states.items():
                key = customer_id.encode()
                # Stores that keep one database per partition (RocksDB) find
                # it through the current event.
                shim = _PartitionOnly(record.origin)
                var.set(weakref.ref(shim))
                # orjson's output keeps a 4 KiB allocation whatever its length;
                # a right-sized copy is what the table holds for a long time.
                data[key] = bytes(memoryview(raw))
                futures.append(await producer.send(changelog, key, raw, record.partition, None, None))
        finally:
            var.set(previous)
        return futures
