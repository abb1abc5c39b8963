"""Table recovery from the changelogs, a fetch at a time instead of a record at a time.

Faust replays a changelog as it delivers any record: a Message, a coroutine hand-off and a
``wait_first`` of two tasks in the consumer's drain loop, an Event and an asyncio queue in the
conductor, then, in ``Recovery._slurp_changelogs``, an ``asyncio.wait_for`` (one more task) per
record before it is buffered and applied a thousand at a time. Measured here that capped a
recovering worker at 8,000-14,000 changelog records/s (73 s for a million customers), while the
same worker grades ~45,000 events/s; a fetch at a time it reads ~400,000 (docs/deploy.md,
"Recovery time"; docs/performance.md, "Recovery a fetch at a time").

:func:`bulk_recovery` gives the consumer's drain loop (streams/faustext/batching.py) a way round that for
the partitions Faust's recovery is reading: the records of one fetch are applied to the table's
store in one ``apply_changelog_batch`` call, and Faust's recovery is told what it would have
recorded itself (the offset read, the time of the last record, the end of recovery). What Faust
decides stays Faust's: which partitions are recovered and from where (its seeks), when a
partition counts as active or standby, when recovery ends (``need_recovery``), what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any

from faust.utils.tracing import finish_span


class ChangelogRecord:
    """A changelog record as a table store reads it from Faust's Event: ``event.key``,
    ``event.value`` and ``event.message`` (``tp``, ``partition``, ``offset``, ``key``, ``value``).

    Tables of raw bytes only (gradeflow's): the key and value are the record's, undecoded."""

    __slots__ = ("tp", "partition", "offset", "key", "value")

    def __init__(self, tp: Any, record: Any) -> None:
        self.tp = tp
        self.partition = record.partition
        self.offset = record.offset
        self.key = record.key
        self.value = record.value

    @property
    def message(self) -> ChangelogRecord:
        return self


BulkApply = Callable[[Sequence[Any]], bool]


def bulk_recovery(app: Any, tp: Any) -> BulkApply | None:
    """A function that applies a fetch's records of changelog partition ``tp`` (aiokafka records,
    in offset order, none before what the drain loop last delivered) as Faust's recovery would and
    says whether that ended the recovery; or None where Faust's own path must run:

    * ``tp`` is not a partition recovery reads now (an active partition outside a recovery, or
      one assigned neither as active nor standby);
    * its table has a changelog hook, or decodes its keys and values;
    * records delivered by Faust's path are still queued: they must be applied first, in order.

    An error while applying propagates out of the drain loop, where Faust's path logs it and goes
    on without those records: a worker that stops is restarted and recovers again; one that goes
    on grades customers on state it lost.
    """
    tables = app.tables
    recovery = getattr(tables, "recovery", None)
    if recovery is None:
        return None
    clear_end_signal_on_start(recovery)
    table = recovery.tp_to_table.get(tp)
    if table is None or table._on_changelog_event is not None:
        return None
    if table.key_serializer != "raw" or table.value_serializer != "raw":
        return None
    if tp in recovery.active_tps:
        if not recovery.in_recovery:  # a straggler after recovery: Faust's path, as before
            return None
        active = True
    elif tp in recovery.standby_tps:
        active = False
    else:
        return None
    if not tables.changelog_queue.empty():
        return None

    def apply(records: Sequence[Any]) -> bool:
        offsets = recovery.active_offsets if active else recovery.standby_offsets
        seen = offsets.get(tp)
        fresh = [ChangelogRecord(tp, r) for r in records if seen is None or r.offset > seen]
        if fresh:
            # What Faust's path buffered is older than these and was counted as read: first.
            buffered = recovery.buffers[table]
            if buffered:
                table.apply_changelog_batch(buffered)
                buffered.clear()
            table.apply_changelog_batch(fresh)
            offsets[tp] = fresh[-1].offset
            now = monotonic()
            if active:
                recovery._active_events_received_at[tp] = now
            else:
                recovery._standby_events_received_at[tp] = now
        return _signal_progress(recovery)

    return apply


def clear_end_signal_on_start(recovery: Any) -> None:
    """Make each recovery start with its end signal cleared.

    Faust's recovery waits on ``signal_recovery_end`` after it starts reading, and relies on its
    own per-record loop, which clears the signal on every record and every five idle seconds, to
    leave it clear. When this module ended the previous recovery no record went through that
    loop: the signal stayed set, and a rebalance within the next seconds found it set and
    declared its recovery done without reading anything, so the worker graded the taken-over
    partitions' customers on empty state. Clearing it as each recovery starts (the instant
    ``in_recovery`` becomes true, before anything can end it) closes that."""
    if getattr(recovery, "_gradeflow_clears_end", False):
        return
    started = recovery._set_recovery_started

    def _set_recovery_started() -> None:
        recovery.signal_recovery_end.clear()
        started()

    recovery._set_recovery_started = _set_recovery_started
    recovery._gradeflow_clears_end = True


def _signal_progress(recovery: Any) -> bool:
    """What ``Recovery._slurp_changelogs`` does after each record it applies: end recovery once no
    active partition is behind its highwater (then True), and report standbys ready once none is."""
    ended = False
    if recovery.in_recovery and not recovery.need_recovery():
        recovery.flush_buffers()
        recovery._set_recovery_ended()
        if recovery._actives_span is not None:
            recovery._actives_span.set_tag("Actives-Ready", True)
        recovery.signal_recovery_end.set()
        ended = True
    tables = recovery.tables
    if recovery._standbys_span is None and tables.standbys_ready:
        return ended
    if not recovery.standby_remaining_total():
        if recovery._standbys_span:
            finish_span(recovery._standbys_span)
            recovery._standbys_span = None
        tables.on_standbys_ready()
    return ended


def standby_progress(app: Any) -> dict[tuple[str, int], tuple[int, int | None]]:
    """Each standby changelog partition of this worker: (the next offset its copy will read, the
    partition's end as of the consumer's last fetch, or None before one).

    A standby is warm when the two are equal: a failover onto it then reads nothing but what
    was written after. Faust's own ``standby_highwaters`` are taken once at the start of a
    recovery and go stale as the active worker writes on; the consumer's fetch highwater moves
    with every fetch, so that is the end used here.
    """
    recovery = getattr(getattr(app, "tables", None), "recovery", None)
    if recovery is None:
        return {}
    try:
        consumer = app.consumer
    except Exception:  # noqa: BLE001 - before the consumer started
        return {}
    progress: dict[tuple[str, int], tuple[int, int | None]] = {}
    for tp in list(recovery.standby_tps):
        seen = recovery.standby_offsets.get(tp)
        position = seen + 1 if seen is not None and seen >= 0 else 0
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - no fetch of this partition yet
            high = None
        progress[(tp.topic, tp.partition)] = (position, high)
    return progress
