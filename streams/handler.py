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
            if result.states:
                clock.note(result.looks, result.states)
            if self.shadow_stats is not None:
                self.shadow_stats.note_batch(result.shadow_signatures, result.states)
                self.shadow_stats.records += len(result.shadow_diffs)
        return result, written
