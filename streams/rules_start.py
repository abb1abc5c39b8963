"""Re-grade every customer graded by another ruleset version, after each table recovery.

A customer's state records the ruleset (``id@version``) that last graded it.
When a worker runs a different version, every customer of the partitions it
owns is re-graded with :func:`rules.changes.regrade_for_rules`: grade changes
with cause ``rules`` for exactly the ladders whose grade differs, the usual
key-downgrade alerts, and the state marked with the new version so that the
next start does nothing. Ids are deterministic (as of each customer's latest
event time), so a sweep cut short by a crash and repeated emits the same ids.

Wiring (streams/app.py, in create_app, after the table and the store)::

    attach_rules_regrade(app, settings, ruleset, table, store, population)

``store`` is the table's :class:`streams.faustext.tables.FaustStateStore` (its one write path);
``population`` is the object attach_population returned (or None). The sweep
starts after each rebalance has recovered the tables (Faust's
``on_rebalance_complete``) and runs in chunks, each holding the worker's writer
lock from reading its states to writing them (streams/clock.py), so the handler
never interleaves with a chunk; customers are written back to the partition
their state lives on, whatever partitioner the producers use.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import islice
from typing import Any

import orjson

from rules.changes import regrade_for_rules
from rules.engine import CompiledRuleset
from rules.state import CustomerState
from streams.faustext.outbox import Outbox, publish
from streams.processor import utcnow

log = logging.getLogger("gradeflow.rules")
CHUNK = 500


def plan(ruleset: CompiledRuleset, items: list[tuple[bytes, bytes]], population: Any = None
         ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], dict[bytes, tuple[bytes, bytes]]]:
    """Pure step of a sweep: for (key, state bytes) pairs, the changes, alerts and new states due.

    New states are ``key → (old bytes, new bytes)``.
    """
    now = utcnow()
    changes: list[tuple[bytes, bytes]] = []
    alerts: list[tuple[bytes, bytes]] = []
    states: dict[bytes, tuple[bytes, bytes]] = {}
    key_of = ruleset.key
    for key, raw in items:
        if CustomerState.graded_by(raw, key_of):
            continue  # most customers after a rebalance: no decode
        state = CustomerState.from_bytes(raw)
        if state.ruleset == key_of:
            continue
        out, warn = regrade_for_rules(key.decode(), ruleset, state, now, population)
        changes += [(key, orjson.dumps(c)) for c in out]
        alerts += [(key, orjson.dumps(a)) for a in warn]
        states[key] = (raw, state.to_bytes())
    return changes, alerts, states


class RulesRegrade:
    def __init__(self, app: Any, settings: Any, ruleset: CompiledRuleset, table: Any, store: Any,
                 population: Any = None, writer: asyncio.Lock | None = None, transactions: Any = None) -> None:
        self.app, self.settings, self.rs, self.table, self.population = app, settings, ruleset, table, population
        # With exactly_once, each chunk's outputs and states in one transaction per input partition
        # (streams/faustext/transactions.py); None: Faust's producer, outputs flushed before states.
        self.transactions = transactions
        self.store = store
        # The worker's writer lock (streams/clock.py): held from reading a chunk's states to writing them.
        self.writer = writer if writer is not None else asyncio.Lock()
        self.running = False
        self.again = False
        self.regraded = 0
        self.sweeps = 0
        # Input partitions this process has swept and owned ever since: everything written on them
        # since was graded here, by this ruleset, so the next rebalance need not read them again.
        # A partition lost and regained (or promoted from a standby, whose copy another worker
        # wrote, maybe with older rules) is not in it.
        self.swept: set[int] = set()

    def active_partitions(self) -> set[int]:
        inputs = self.settings.topics.transactions
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == inputs}

    async def sweep(self) -> int:
        """Re-grade every customer of this worker's partitions not graded by this ruleset."""
        active = self.active_partitions()
        todo = active - self.swept
        self.swept &= active
        if not todo:
            self.sweeps += 1
            return 0
        names = self.settings.topics
        thresholds = self.population.thresholds if self.population is not None else None
        done = 0
        held = iter(list(self.store.partition_items(todo)))  # keys and partitions now; states re-read below
        while chunk := list(islice(held, CHUNK)):
            async with self.writer:
                # Read under the lock: the handler cannot change these states until they are written.
                keys = [key for key, _, _ in chunk]
                where = {key: partition for key, partition, _ in chunk}
                items = [(key, raw) for key, raw in zip(keys, self.store.get_keys(keys)) if raw is not None]
                if self.transactions is not None:
                    done += await self._chunk_in_transactions(items, where, thresholds)
                    continue
                changes, alerts, states = plan(self.rs, items, thresholds)
                if not states:
                    continue
                producer = self.app.producer._ensure_producer()
                await publish(producer, {names.grade_changes: changes, names.alerts: alerts})  # before the states
                await self.store.replace(producer, ((key, old, new, where[key])
                                                    for key, (old, new) in states.items()))
            done += len(states)
        self.regraded += done
        self.sweeps += 1
        self.swept |= todo & self.active_partitions()
        if done:
            log.info("gradeflow: re-graded %d customers for ruleset %s", done, self.rs.key)
        return done

    async def _chunk_in_transactions(self, items: list[tuple[bytes, bytes]], where: dict[bytes, int],
                                     thresholds: Any) -> int:
        """A chunk with exactly_once: each partition's changes, alerts and states in one transaction
        of its producer. Called under the writer lock."""
        names = self.settings.topics
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, raw in items:
            by_partition.setdefault(where[key], []).append((key, raw))
        done = 0
        for partition, mine in sorted(by_partition.items()):
            changes, alerts, states = plan(self.rs, mine, thresholds)
            if not states:
                continue
            async with self.transactions.step(partition) as producer:
                if producer is None:
                    continue  # revoked meanwhile: its new owner sweeps it
                outbox = Outbox()
                outbox.extend(names.grade_changes, changes)
                outbox.extend(names.alerts, alerts)
                self.store.write_many(outbox, [(key, new, partition) for key, (_old, new) in states.items()])
                await outbox.send(producer)
            done += len(states)
        return done

    async def run(self) -> None:
        if self.running:
            self.again = True
            return
        self.running = True
        try:
            while True:
                self.again = False
                try:
                    await self.sweep()
                except Exception:  # noqa: BLE001 - the next rebalance retries; grading goes on
                    log.exception("gradeflow: re-grading for new rules failed")
                if not self.again:
                    break
        finally:
            self.running = False


def attach_rules_regrade(app: Any, settings: Any, ruleset: CompiledRuleset, table: Any, store: Any,
                         population: Any = None, writer: asyncio.Lock | None = None,
                         transactions: Any = None) -> RulesRegrade:
    """Sweep after every rebalance's recovery; return the sweeper (counters for tests and metrics)."""
    regrade = RulesRegrade(app, settings, ruleset, table, store, population, writer, transactions)
    app.gradeflow_rules_regrade = regrade
    tasks: set[asyncio.Task] = set()

    @app.on_rebalance_complete.connect
    async def _after_recovery(sender: Any = None, **kwargs: Any) -> None:
        task = asyncio.ensure_future(regrade.run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return regrade
