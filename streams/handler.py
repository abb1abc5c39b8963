"""The batch handler's work on a fetch of records, from reading states to writing them.

:class:`BatchGrader` is what the Faust agent (streams/app.py) calls for each fetch, and what the
tests run against a dict store and a recording producer, so both run the same code. It holds the
worker's writer lock (streams/clock.py) from reading the batch's states to writing them: grade
with the pure :func:`streams.processor.process_batch`, send the outputs and wait for the broker
to have them, then write the states to the table and queue them, with each partition's stream
time after them, for the changelog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rules.engine import CompiledRuleset
from rules.erasure import Erasures
from streams.faustext.outbox import Outbox, Sent
from streams.faustext.transactions import input_offsets
from streams.merging import forward
from streams.processor import BatchResult, Record, process_batch, utcnow
from streams.settings import shadow_diffs_topic


class BatchGrader:
    """Grades fetches for one worker: ``store`` is the table's store (``get``/``get_many`` and
    ``write_many``), ``clock`` the worker's :class:`streams.clock.Clock`, ``producer`` a function
    giving the AIOKafkaProducer to send through."""

    def __init__(self, settings: Any, ruleset: CompiledRuleset, store: Any, clock: Any, population: Any,
                 writer: asyncio.Lock, producer: Callable[[], Any], shadows: tuple[CompiledRuleset, ...] = (),
                 shadow_stats: Any = None) -> None:
        self.settings, self.ruleset, self.store, self.clock = settings, ruleset, store, clock
        self.population, self.writer, self.producer = population, writer, producer
        names = settings.topics
        self.out_changes, self.out_alerts, self.out_dead = names.grade_changes, names.alerts, names.dead_letters
        self.erasures: Erasures | None = None  # the worker's known erasures (streams/erasure.py), if erasure is on
        # Shadow rulesets (streams/shadow.py): graded beside the ruleset, published only on their topic.
        self.shadows, self.shadow_stats = shadows, shadow_stats
        self.out_shadow = shadow_diffs_topic(settings) if shadows else ""
        self.merges_topic: str | None = None  # where events of merged-away ids go (streams/merging.py), if merges are on
        # The control record that made ``ruleset`` the active one (streams/rules_control.py switches
        # both under the writer lock, between two batches); None: the ruleset the worker started with.
        self.promotion_id: str | None = None

    async def grade(self, records: list[Record]) -> tuple[BatchResult, Sent | None]:
        """Grade one fetch; return its result and the sent state writes (to settle before the
        records are acknowledged), or None when there were none."""
        settings, clock, store = self.settings, self.clock, self.store
        async with self.writer:
            population = self.population
            result = process_batch(records, self.ruleset, store, utcnow(),
                                   population=population.thresholds if population else None,
                                   allowed_lateness_days=settings.allowed_lateness_days,
                                   max_future_skew_s=settings.max_future_skew_s,
                                   clock_horizon=clock.look_horizon,
                                   stream_time=clock.stream_times({r.partition for r in records}),
                                   erased=self.erasures, shadows=self.shadows, promotion_id=self.promotion_id)
            producer = self.producer()
            outbox = Outbox()
            self._outputs(outbox, result)
            # Outputs first, durable; then state. A crash in between replays the
            # batch with the same deterministic outputs; the reverse order could
            # record state whose grade changes were never delivered.
            if outbox:
                await (await outbox.send(producer)).acked()
            written = None
            # Each partition's stream time after its states, on the same changelog partition: a
            # worker that recovers it finds the time those states were graded up to.
            writes = [(cid.encode(), raw, record.partition) for cid, (raw, record) in result.states.items()]
            writes += clock.advanced(result.stream_time)
            if writes:
                store.write_many(outbox, writes)
                written = await outbox.send(producer)
            self._noted(result)
        return result, written

    def _outputs(self, outbox: Outbox, result: BatchResult) -> None:
        """A result's outputs, in order: dead letters, changes, alerts, shadow records, and the events
        of merged-away ids on their way to the id they were merged into."""
        outbox.extend(self.out_dead, result.dead_letters)
        outbox.extend(self.out_changes, result.grade_changes)
        outbox.extend(self.out_alerts, result.alerts)
        if result.shadow_diffs:
            outbox.extend(self.out_shadow, result.shadow_diffs)
        if result.forwarded:
            if self.merges_topic is None:
                raise RuntimeError("events of a merged-away customer id, with GRADEFLOW_CUSTOMER_MERGES off: "
                                   "turn it back on (docs/customers.md)")
            forward(outbox, self.merges_topic, result.forwarded, utcnow())

    def _noted(self, result: BatchResult) -> None:
        """What the clock and the shadow counters learn from a result once its states are written."""
        if result.states:
            self.clock.note(result.looks, result.states)
        if self.shadow_stats is not None:
            self.shadow_stats.note_batch(result.shadow_signatures, result.states)
            self.shadow_stats.records += len(result.shadow_diffs)

    async def grade_in_transactions(self, records: list[Record], transactions: Any) -> tuple[list[BatchResult], Any]:
        """Grade one fetch exactly once: per input partition, grade its records, then send their
        outputs, their states (with the partition's stream time) and hand their input offsets to
        one transaction of the partition's producer (``transactions``, a
        :class:`streams.faustext.transactions.PartitionProducers`). Returns the results and an
        awaitable of the commits, which run while the next fetch is graded; a failed commit stops
        the worker (its table holds states that were never committed).

        Records of a partition this worker no longer owns (revoked since the fetch) are left to its
        new owner, ungraded and uncommitted."""
        settings, clock, store = self.settings, self.clock, self.store
        by_partition: dict[int, list[Record]] = {}
        for record in records:
            by_partition.setdefault(record.partition, []).append(record)
        results: list[BatchResult] = []
        commits: list[Any] = []
        async with self.writer:
            population = self.population
            for partition, mine in sorted(by_partition.items()):
                mine = transactions.ungraded(mine, store)
                if not mine:
                    continue
                producer = await transactions.begin(partition)
                if producer is None:
                    continue
                result = process_batch(mine, self.ruleset, store, utcnow(),
                                       population=population.thresholds if population else None,
                                       allowed_lateness_days=settings.allowed_lateness_days,
                                       max_future_skew_s=settings.max_future_skew_s,
                                       clock_horizon=clock.look_horizon,
                                       stream_time=clock.stream_times({partition}),
                                       erased=self.erasures, shadows=self.shadows, promotion_id=self.promotion_id)
                outbox = Outbox()
                self._outputs(outbox, result)
                # Outputs and states in one transaction: no order between them is needed, the
                # commit makes all visible at once. The stream time goes with the states it
                # graded, on the same changelog partition.
                writes = [(cid.encode(), raw, record.partition) for cid, (raw, record) in result.states.items()]
                writes += clock.advanced(result.stream_time)
                # And how far the partition's inputs are graded: what a seek fetches again below
                # it is skipped (PartitionProducers.ungraded).
                writes += transactions.graded(mine, store)
                store.write_many(outbox, writes)
                await outbox.send(producer)
                commits.append(transactions.commit_soon(partition, producer, input_offsets(mine)))
                self._noted(result)
                results.append(result)

        async def settle() -> None:
            await asyncio.gather(*commits)

        return results, settle()
