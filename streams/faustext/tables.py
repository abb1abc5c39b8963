"""Customer state on a Faust table, behind the small StateReader protocol.

gradeflow writes the changelog itself (:class:`FaustStateStore`), so one thing Faust 0.15.3
does in the callback of ``table[key] = value`` is done here: recording, per changelog
partition, the offset up to which a store holds data (``set_persisted_offset``), once the
broker has the records (:meth:`FaustStateStore.settle`). Recovery reads only what
follows; without it a RocksDB worker restarted on its own volume, or a promoted RocksDB
standby, re-read every changelog from the beginning.

Faust's memory store ignores those offsets (it holds nothing across a restart) and, after
each recovery, drops the keys of every partition that is not active here, standby copies
included: with ``memory://`` a takeover replays the taken-over partitions' changelogs from the
beginning, and a standby saves nothing (the settings refuse that pair; docs/deploy.md, "Recovery
time", tells why gradeflow does not keep its own memory store for it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, cast

from faust import streams as faust_streams
from faust.stores.memory import Store as MemoryStore
from faust.types import TP

from schemas.errors import ConfigurationError
from streams.faustext.outbox import Outbox, Sent
from streams.faustext.state_index import StateIndex

# The state table's keys that hold no customer start so (streams/clock.py).
RESERVED = b"\x00"


class IndexedMemoryStore(MemoryStore):
    """Faust's memory store over a :class:`~streams.faustext.state_index.StateIndex` instead of a dict.

    What ``GRADEFLOW_STORE=memory://`` runs (registered as the Faust store ``gradeflow-memory://``
    in pyproject.toml): the same store, with batch reads and writes of states (docs/performance.md,
    "State lookups as customers grow").
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = StateIndex()

    def apply_changelog_batch(self, batch: Iterable[Any], to_key: Callable[[Any], Any],
                              to_value: Callable[[Any], Any]) -> None:
        """Apply changelog records in one batch write (and one batch delete): Faust's memory store
        writes them one ``__setitem__`` at a time. The last record of a key wins; a record with no
        value (a tombstone) removes the key unless a later one gives it a value again."""
        latest: dict[Any, Any] = {}
        key_partition = self._key_partition
        for event in batch:
            key = to_key(event.key)
            message = event.message
            latest[key] = None if message.value is None else to_value(event.value)
            key_partition[key] = message.partition
        keys = [key for key, value in latest.items() if value is not None]
        index = cast(StateIndex, self.data)
        index.set_many(keys, [latest[key] for key in keys])
        gone = [key for key, value in latest.items() if value is None]
        if gone:
            index.delete_many(gone)
            for key in gone:
                del key_partition[key]

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """As Faust's memory store: drop the keys of partitions not active here, in one batch
        (after which the table shrinks to what it still holds)."""
        active = {partition for _, partition in active_tps}
        gone = [key for key, partition in self._key_partition.items() if partition not in active]
        cast(StateIndex, self.data).delete_many(gone)
        for key in gone:
            del self._key_partition[key]


class _CurrentEvent:
    """What a table store reads of Faust's current event: ``event.message.partition``."""

    __slots__ = ("message", "partition", "__weakref__")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.message = self


_UNKNOWN: Any = object()
_READ_CHUNK = 4096  # keys per batch read of a whole partition's states


class FaustStateStore:
    """Reads and batched writes of customer state on a Faust table of raw bytes.

    Faust's ``table[key] = value`` sends each change to the changelog through a
    buffer drained one message per event-loop turn, to the partition of the
    *current event*. Here a batch writes each touched customer once, straight
    to the producer, to the changelog partition of the customer's own input
    partition, so that recovery after a rebalance restores every customer on
    the partition its events arrive on. Every writer of state (the batch
    handler, the clock, the rules sweep) goes through :meth:`write_many` and
    :meth:`settle`.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self._index: Any = _UNKNOWN

    def _memory(self) -> Any:
        """The memory store's :class:`~streams.faustext.state_index.StateIndex`, or None for RocksDB, which
        needs Faust's own access path (one database per partition)."""
        if self._index is _UNKNOWN:
            data = self.table.data  # created on first use, then the table's for good
            if isinstance(data, IndexedMemoryStore):
                self._index = data.data
            elif isinstance(data, MemoryStore):
                # gradeflow maps memory:// to its own store (streams/app.py); Faust's dict store
                # would need a second write path that nothing runs.
                raise ConfigurationError(f"table {self.table.name!r} is on Faust's memory store; gradeflow's is "
                                         f"gradeflow-memory://, which GRADEFLOW_STORE=memory:// selects")
            else:
                self._index = None
        return self._index

    def get(self, customer_id: str) -> bytes | None:
        """The state bytes of ``customer_id``, or None for a customer never seen."""
        memory = self._memory()
        if memory is not None:
            # The index itself: Faust's Mapping.get costs three Python calls per customer.
            return memory.get(customer_id.encode())
        return self.table.get(customer_id.encode())

    def get_key(self, key: bytes) -> bytes | None:
        """The value of a table key (a customer's or one of the table's own, streams/clock.py)."""
        memory = self._memory()
        if memory is not None:
            return memory.get(key)
        return self.table.get(key)

    def partition_of(self, key: bytes) -> int | None:
        """The input partition whose changelog holds ``key`` on this worker, or None when this
        worker holds no state for it. Where the state lives, never a hash of the key: producers
        partition as they like (librdkafka's default is not Kafka's Java one)."""
        data = self.table.data
        if self._memory() is not None:
            return data._key_partition.get(key)
        for partition in sorted(self._rocksdb_partitions()):
            if data._db_for_partition(partition).get(key) is not None:
                return partition
        return None

    def _rocksdb_partitions(self) -> set[int]:
        data = self.table.data
        return {p for p in getattr(data, "_dbs", {})}

    def get_many(self, customer_ids: list[str]) -> list[bytes | None]:
        """The state bytes of each of ``customer_ids`` (None for one never seen), in order."""
        return self._read([customer_id.encode() for customer_id in customer_ids])

    def get_keys(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of table keys, in order (None for one not held)."""
        return self._read(keys)

    def _read(self, keys: list[bytes]) -> list[bytes | None]:
        """The state bytes of each key, in order: one batch read from the state index, else one
        lookup each (RocksDB)."""
        memory = self._memory()
        if memory is not None:
            return memory.get_many(keys)
        get = self.table.get
        return [get(key) for key in keys]

    def partition_items(self, partitions: Collection[int]) -> Iterator[tuple[bytes, int, bytes]]:
        """Every ``(key, input partition, state bytes)`` of a customer this worker holds for the
        input partitions ``partitions`` (the table's own keys, streams/clock.py, left out).

        For the rules sweep and the clock's rebuild after a rebalance. The memory store
        knows each key's partition and RocksDB keeps one database per partition, so neither
        hashes keys (murmur2 in Python: seconds per million) nor looks them up one by one.
        Callers may yield between items; a state changed meanwhile shows either version.
        """
        data = self.table.data
        memory = self._memory()
        if memory is not None:
            wanted = set(partitions)
            # A snapshot: the handler adds keys while a caller waits.
            held = [(key, partition) for key, partition in list(data._key_partition.items())
                    if partition in wanted and not key.startswith(RESERVED)]
            for start in range(0, len(held), _READ_CHUNK):  # chunks: callers yield between items
                chunk = held[start:start + _READ_CHUNK]
                for (key, partition), raw in zip(chunk, self._read([key for key, _ in chunk])):
                    if raw is not None:
                        yield key, partition, raw
        else:  # RocksDB (the settings allow no third store): one database per partition
            for partition in sorted(partitions):
                for key, raw in data._visible_items(data._db_for_partition(partition)):
                    if not key.startswith(RESERVED):
                        yield key, partition, raw

    def write_many(self, outbox: Outbox, states: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Store each ``(key, state bytes, input partition)`` and queue it for that partition's changelog.

        The bytes are held as given, for as long as the customer is: right-sized ones, as
        ``CustomerState.to_bytes`` makes (an orjson output holds 4 KiB whatever its length).

        Send the outbox, then :meth:`settle` it: the state is in the table at once (the next
        batch reads it), and on the changelog once settled.
        """
        table = self.table
        changelog = table.changelog_topic.get_topic_name()
        add = outbox.add
        memory = self._memory()
        if memory is not None:
            # Faust's memory store drops, after a rebalance, the keys of partitions the
            # worker no longer owns, by the partition it saw each key on. A key's partition
            # never changes (the topic check refuses a new partition count), and at a million
            # customers a lookup in that dict is a microsecond of cache misses: only new keys go in.
            key_partition = table.data._key_partition
            # One batch write, whose lookups overlap their misses as the batch's read did.
            batch = states if isinstance(states, list) else list(states)
            for i in memory.set_many([key for key, _, _ in batch], [raw for _, raw, _ in batch]):
                key_partition[batch[i][0]] = batch[i][2]
            for key, raw, partition in batch:
                add(changelog, key, raw, partition)
            return
        data = table.data
        var = faust_streams._current_event
        previous = var.get(None)
        try:
            for key, raw, partition in states:
                # Stores that keep one database per partition (RocksDB) find
                # it through the current event.
                shim = _CurrentEvent(partition)
                var.set(cast(Any, weakref.ref(shim)))
                data[key] = raw
                add(changelog, key, raw, partition)
        finally:
            var.set(previous)

    def holds(self, key: bytes, partition: int) -> bool:
        """Whether this worker holds a state for ``key`` on input partition ``partition``."""
        data = self.table.data
        if self._memory() is not None:
            return bool(data._key_partition.get(key) == partition and self._memory().get(key) is not None)
        if partition not in self._rocksdb_partitions():
            return False
        return data._db_for_partition(partition).get(key) is not None

    def delete_many(self, outbox: Outbox, keys: Iterable[tuple[bytes, int]]) -> None:
        """Remove each ``(key, input partition)`` from the table and queue its tombstone for that
        partition's changelog (erasure, streams/erasure.py). Send the outbox, then :meth:`settle` it."""
        changelog = self.table.changelog_topic.get_topic_name()
        data = self.table.data
        memory = self._memory()
        for key, partition in keys:
            if memory is not None:
                memory.delete_many([key])
                data._key_partition.pop(key, None)
            else:
                data._db_for_partition(partition).delete(key)
            outbox.add(changelog, key, None, partition)

    async def replace(self, producer: Any, writes: Iterable[tuple[bytes, bytes, bytes, int]]) -> list[bytes]:
        """Write each ``(key, old, new, input partition)`` whose state is still ``old``, then settle.

        For the writers beside the batch handler (the clock, the rules sweep): they read states,
        wait on the broker, and must not overwrite what the handler applied meanwhile. Returns
        the keys skipped for that reason. ``producer`` is the ``AIOKafkaProducer``.
        """
        fresh: list[tuple[bytes, bytes, int]] = []
        skipped: list[bytes] = []
        writes = list(writes)
        currents = self._read([key for key, _, _, _ in writes])
        for (key, old, new, partition), current in zip(writes, currents):
            if current == old:
                fresh.append((key, new, partition))
            else:
                skipped.append(key)
        if fresh:
            outbox = Outbox()
            self.write_many(outbox, fresh)
            await self.settle(await outbox.send(producer))
        return skipped

    async def settle(self, sent: Sent) -> None:
        """Wait until the broker has ``sent`` (an outbox with state written by :meth:`write_many`),
        then record how far the changelog holds this store's data.

        Recovery (a restart on the same RocksDB volume, a promoted standby) then reads only
        the changelog after that offset. Faust's memory store ignores it.
        """
        data = self.table.data
        for metadata, count in zip(await sent.acked(), sent.counts):
            if metadata is not None:  # None: acks=0, nothing known
                data.set_persisted_offset(TP(metadata.topic, metadata.partition), metadata.offset + count - 1)
