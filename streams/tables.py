"""Customer state on a Faust table, behind the small StateReader protocol."""

from __future__ import annotations

import weakref
from typing import Any

from faust import streams as faust_streams

from streams.processor import Record


class FaustStateStore:
    """Reads and batched writes of customer state on a Faust table of raw bytes."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, customer_id: str) -> bytes | None:
        return self.table.get(customer_id.encode())

    def put_many(self, states: dict[str, tuple[bytes, Record]]) -> None:
        """Write each customer's new state once, to the changelog partition of its own input.

        Faust sends a table write to the changelog partition of the *current*
        event. In a batch that is the last event taken, which may belong to
        another partition, so each write is made with the customer's own
        event as current; otherwise recovery would restore a customer's state
        on the wrong partition after a rebalance.
        """
        table = self.table
        var = faust_streams._current_event
        previous = var.get(None)
        try:
            for customer_id, (raw, record) in states.items():
                var.set(weakref.ref(record.origin))
                table[customer_id.encode()] = raw
        finally:
            var.set(previous)
