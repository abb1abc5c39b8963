"""The Faust app: one batch handler over both input topics, one state table, three sinks.

The handler only moves data: it takes a fetch of raw records (see
:mod:`streams.faustext.batching` for why not one event at a time), hands it to
:func:`streams.processor.process_batch` (pure), sends the outputs, waits until
they are on the broker, and only then writes the new state to the table (and
so to its changelog). A crash at any point therefore either replays the batch
(same deterministic outputs, consumers drop duplicates by ``event_id``) or
finds its effects complete; it never records state whose outputs were lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import Any, cast

import faust
import orjson

from rules.engine import CompiledRuleset
from streams.kafka_config import bootstrap_list, faust_broker_options
from streams.downstream.wiring import attach_downstream, observe_batch
from streams.processor import INTERACTIONS, TRANSACTIONS, BatchResult, Record
from streams.settings import Settings
from streams.faustext.batching import BatchingApp, deliver_in_batches
from streams.clock import attach_clock
from streams.population import attach_population
from streams.erasure import attach_erasure
from streams.merging import attach_merging
from streams.rules_start import attach_rules_regrade
from streams.shadow import attach_shadow
from streams.rules_control import Start, attach_rules_control
from streams.handler import BatchGrader
from streams.faustext.outbox import MAX_BATCH_BYTES
from streams.faustext.tables import FaustStateStore
from streams.faustext.transactions import attach_transactions

log = logging.getLogger("gradeflow")


@dataclass
class Counters:
    """Running totals; ``consumed == applied + duplicates + replayed + dead_lettered + refused`` always holds."""

    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    refused: int = 0  # events of erased customers from before their erasure (streams/erasure.py)
    forwarded: int = 0  # events of ids merged into another, sent on to it (streams/merging.py)
    grade_changes: int = 0
    alerts: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    first_batch_at: float | None = None  # wall time the first batch was taken
    last_batch_at: float | None = None  # wall time the last batch's outputs and state were written
    # The process's CPU time (every thread) at the same two moments: what a batch costs the
    # worker, steadier than its wall-clock rate on a shared machine (bench/run.py reports it).
    first_batch_cpu_s: float | None = None
    last_batch_cpu_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def create_app(settings: Settings, ruleset: CompiledRuleset, shadows: tuple[CompiledRuleset, ...] = (),
               start: Start | None = None) -> faust.App:
    """Build the Faust app for ``settings`` running ``ruleset``, with ``shadows`` graded beside it
    (streams/shadow.py); ``start``: what the worker read of the rules-control topic before
    (streams/rules_control.py; None: follow it from its beginning)."""
    app = BatchingApp(
        settings.group_id,
        broker=[f"kafka://{hp}" for hp in bootstrap_list(settings)],
        # memory:// is Faust's memory store over gradeflow's state index (streams/faustext/tables.py).
        store="gradeflow-memory://" if settings.store.startswith("memory:") else settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        key_serializer="raw",
        value_serializer="raw",
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        producer_acks=-1,
        producer_max_batch_size=MAX_BATCH_BYTES,
        broker_max_poll_records=settings.batch_size,
        stream_buffer_maxsize=max(4096, settings.batch_size * 2),
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=settings.standby_replicas,
        **faust_broker_options(settings),
    )
    app.conf.gradeflow_settings = settings  # type: ignore[attr-defined]
    app.fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
    exactly_once = settings.processing_guarantee == "exactly_once"
    app.read_committed = exactly_once
    counters = Counters()
    app.gradeflow_counters = counters  # type: ignore[attr-defined]

    names = settings.topics
    roles = {names.transactions: TRANSACTIONS, names.interactions: INTERACTIONS}
    # With exactly_once the input offsets are committed only inside the transactions: Faust's own
    # commits, which follow acks, must never move them (acks off for these topics).
    inputs = app.topic(names.transactions, names.interactions,
                       key_type=bytes, value_type=bytes, acks=not exactly_once)
    table = app.Table("customer-state", partitions=settings.partitions,
                      key_type=bytes, value_type=bytes)
    store = FaustStateStore(table)
    # One writer of state at a time: the handler, a wake of the clock, a step of the rules sweep
    # each hold it from reading states to writing them (streams/clock.py).
    writer = asyncio.Lock()
    # One transactional producer per input partition with exactly_once (streams/faustext/transactions.py).
    transactions = attach_transactions(app, settings, writer) if exactly_once else None
    clock = attach_clock(app, settings, ruleset, table, store, writer, transactions=transactions)  # cause "clock": re-grading by time alone
    population = attach_population(app, settings, ruleset, store)  # None without relative grades
    regrade = attach_rules_regrade(app, settings, ruleset, table, store, population, writer,
                                   transactions=transactions)  # cause "rules" after a version change
    shadow_stats = attach_shadow(app, settings, ruleset, shadows, store, writer)  # None without shadow rulesets
    clock.shadows = shadows
    grader = BatchGrader(settings, ruleset, store, clock, population, writer,
                         lambda: cast(Any, app.producer)._ensure_producer(),  # the AIOKafkaProducer under Faust's
                         shadows, shadow_stats)
    erasure = attach_erasure(app, settings, store, clock, writer, grader.producer)  # None without GRADEFLOW_ERASURE_KEY
    if erasure is not None:
        grader.erasures = erasure.erasures
    merging = attach_merging(app, settings, ruleset, store, clock, population, writer, grader)  # None unless GRADEFLOW_CUSTOMER_MERGES
    # Promotions and rollbacks: switches all of the above between two holders of the writer lock.
    rules = attach_rules_control(app, settings, start or Start(ruleset, None, 0), writer, grader, clock, regrade,
                                 population)
    rules.merging = merging

    def decode(messages: list[Any]) -> list[Record]:
        if counters.first_batch_at is None:
            counters.first_batch_at = time.time()
            counters.first_batch_cpu_s = time.process_time()
        by_topic = counters.by_topic
        records = []
        for m in messages:
            topic = m.topic
            records.append(Record(roles[topic], topic, m.partition, m.offset, m.key, m.value, m.timestamp, m))
            by_topic[topic] = by_topic.get(topic, 0) + 1
        return records

    def count(result: BatchResult) -> None:
        counters.consumed += result.consumed
        counters.applied += result.applied
        counters.duplicates += result.duplicates
        counters.replayed += result.replayed
        counters.dead_lettered += result.dead
        counters.refused += result.refused
        counters.forwarded += len(result.forwarded)
        counters.grade_changes += len(result.grade_changes)
        counters.alerts += len(result.alerts)

    def finished(records: list[Record]) -> None:
        observe_batch(app, records)
        counters.last_batch_at = time.time()
        counters.last_batch_cpu_s = time.process_time()

    async def grade_exactly_once(messages: list[Any]) -> Awaitable[None]:
        """One fetch, in one transaction per input partition; nothing is acked to Faust."""
        records = decode(messages)
        if erasure is not None:
            await erasure.ready.wait()  # every erasure known before any event is graded
        results, commits = await grader.grade_in_transactions(records, transactions)
        for result in results:
            count(result)
        finished(records)
        return cast(Awaitable[None], commits)

    async def grade(messages: list[Any]) -> Awaitable[None]:  # aiokafka ConsumerRecords of one fetch
        """One fetch of input records: decode, grade, send, then store state, then ack."""
        records = decode(messages)
        if erasure is not None:
            await erasure.ready.wait()  # every erasure known before any event is graded
        result, written = await grader.grade(records)
        count(result)
        finished(records)

        async def settle() -> None:
            # Faust may commit past these offsets only once the new states are
            # on the changelog. This runs while the next batch is graded.
            if written is not None:
                await store.settle(written)
            cast(Any, app.consumer).ack_records(messages)  # streams/faustext/batching.py's consumer

        return settle()

    deliver_in_batches(app, inputs, grade_exactly_once if exactly_once else grade)

    @app.timer(interval=settings.report_interval)
    async def report() -> None:
        # One line per interval, machine-readable: the benchmark reads it.
        if counters.consumed:
            stats = counters.as_dict()
            if transactions is not None:
                stats["transactions"] = transactions.stats.as_dict()
            log.info("gradeflow-stats %s", orjson.dumps(stats).decode())

    attach_downstream(app, settings, table)
    return app
