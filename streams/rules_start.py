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
import time
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

import orjson

from rules import shadow
from rules.changes import regrade_for_rules
from rules.engine import CompiledRuleset
from rules.state import CustomerState
from streams.faustext.outbox import Outbox, publish
from streams.processor import utcnow
from streams.settings import shadow_diffs_topic

log = logging.getLogger("gradeflow.rules")
CHUNK = 500


def plan(ruleset: CompiledRuleset, items: list[tuple[bytes, bytes]], population: Any = None,
         shadows: tuple[CompiledRuleset, ...] = (), diffs: list[tuple[bytes, bytes]] | None = None,
         signatures: dict[bytes, tuple[Any, ...]] | None = None, promotion_id: str | None = None,
         ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], dict[bytes, tuple[bytes, bytes]]]:
    """Pure step of a sweep: for (key, state bytes) pairs, the changes, alerts and new states due.

    New states are ``key → (old bytes, new bytes)``. With ``shadows`` (rules/shadow.py) each
    re-graded customer's shadows follow, as of the same instant: their grade-shadow-diffs records
    are appended to ``diffs`` and their signatures put in ``signatures``. ``promotion_id``: the
    control record that made ``ruleset`` the active one (streams/rules_control.py), None for the
    ruleset the worker started with.
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
        if state.ruleset == key_of or state.merged_into is not None:
            continue  # up to date, or merged into another id (streams/merging.py): never re-graded here
        before = shadow.signature(shadows, state) if shadows else None
        out, warn = regrade_for_rules(key.decode(), ruleset, state, now, population, promotion_id)
        if shadows:
            shadow.forget_others(shadows, state)
            shadow.follow_rules(shadows, key.decode(), state, now)
            after = shadow.signature(shadows, state)
            if signatures is not None:
                signatures[key] = after
            if diffs is not None and after != before:
                diffs.append((key, orjson.dumps(shadow.diff_record(ruleset, shadows, key.decode(), state, now))))
        changes += [(key, orjson.dumps(c)) for c in out]
        alerts += [(key, orjson.dumps(a)) for a in warn]
        states[key] = (raw, state.to_bytes())
    return changes, alerts, states


class CoalescedSweep:
    """A sweep over the worker's partitions that runs once at a time: asked to run while it runs,
    it runs once more when done (a rebalance during a sweep brings partitions it has not seen)."""

    failure = "gradeflow: the sweep failed"  # logged, with the traceback, when a run fails

    def __init__(self) -> None:
        self.running = False
        self.again = False

    async def sweep(self) -> int:
        raise NotImplementedError

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
                    log.exception(self.failure)
                if not self.again:
                    break
        finally:
            self.running = False


class SweepProgress:
    """How far the re-grade of this worker's partitions is: customers examined of the total, the
    rate, and which partitions are done (every customer graded by the active ruleset)."""

    def __init__(self) -> None:
        self.ruleset = ""
        self.partitions: set[int] = set()
        self.partitions_done: set[int] = set()
        self.total = 0
        self.done = 0
        self.regraded = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.finished_at is not None

    def begin(self, ruleset: str, active: set[int], done: set[int], total: int | None) -> None:
        self.ruleset = ruleset
        self.partitions, self.partitions_done = set(active), set(done)
        self.total, self.done, self.regraded = total or 0, 0, 0
        self.started_at, self.finished_at = time.monotonic(), None

    def reopen(self, ruleset: str) -> None:
        self.ruleset = ruleset
        self.partitions_done = set()
        self.finished_at = None

    def step(self, examined: int, regraded: int) -> None:
        self.done += examined
        self.regraded += regraded

    def finish(self, done: set[int]) -> None:
        self.partitions_done = set(done)
        self.finished_at = time.monotonic()

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before the first step and once finished."""
        if self.complete or self.started_at is None or self.done <= 0:
            return None
        elapsed = time.monotonic() - self.started_at
        return max(0.0, (self.total - self.done) * elapsed / self.done)

    def as_dict(self) -> dict[str, Any]:
        return {"ruleset": self.ruleset, "partitions": sorted(self.partitions),
                "partitions_done": sorted(self.partitions_done), "customers_total": self.total,
                "customers_done": self.done, "regraded": self.regraded, "eta_s": self.eta_s(),
                "complete": self.complete}


class RulesRegrade(CoalescedSweep):
    failure = "gradeflow: re-grading for new rules failed"

    def __init__(self, app: Any, settings: Any, ruleset: CompiledRuleset, table: Any, store: Any,
                 population: Any = None, writer: asyncio.Lock | None = None, transactions: Any = None) -> None:
        super().__init__()
        self.app, self.settings, self.rs, self.table, self.population = app, settings, ruleset, table, population
        # With exactly_once, each chunk's outputs and states in one transaction per input partition
        # (streams/faustext/transactions.py); None: Faust's producer, outputs flushed before states.
        self.transactions = transactions
        self.store = store
        # The worker's writer lock (streams/clock.py): held from reading a chunk's states to writing them.
        self.writer = writer if writer is not None else asyncio.Lock()
        self.regraded = 0
        self.sweeps = 0
        self.promotion_id: str | None = None  # see plan()
        self.chunk = int(getattr(settings, "rules_regrade_chunk", CHUNK))
        self.pause_s = float(getattr(settings, "rules_regrade_pause_s", 0.0))
        # Bumped by every ruleset switch: a sweep that a switch overtook marks nothing as swept.
        self.generation = 0
        # Progress of the current (or last) sweep, for the API, the metrics and the rules-control topic.
        self.progress = SweepProgress()
        self.on_progress: Callable[[], Awaitable[None]] | None = None
        # Input partitions this process has swept and owned ever since: everything written on them
        # since was graded here, by this ruleset, so the next rebalance need not read them again.
        # A partition lost and regained (or promoted from a standby, whose copy another worker
        # wrote, maybe with older rules) is not in it.
        self.swept: set[int] = set()
        # Shadow rulesets (streams/shadow.py sets them): they follow every customer re-graded here.
        self.shadows: tuple[CompiledRuleset, ...] = ()
        self.shadow_stats: Any = None

    def active_partitions(self) -> set[int]:
        inputs = self.settings.topics.transactions
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == inputs}

    def switch(self, ruleset: CompiledRuleset, promotion_id: str | None) -> None:
        """A new active ruleset (called under the writer lock): every partition is swept again."""
        self.rs, self.promotion_id = ruleset, promotion_id
        self.generation += 1
        self.swept = set()
        # A sweep under way goes on by the new ruleset but finishes nothing: until the next sweep
        # is done no partition counts as done for it (what `rules promote --wait` waits for).
        self.progress.reopen(ruleset.key)

    async def sweep(self) -> int:
        """Re-grade every customer of this worker's partitions not graded by this ruleset."""
        active = self.active_partitions()
        todo = active - self.swept
        self.swept &= active
        generation = self.generation
        progress = self.progress
        progress.begin(self.rs.key, active, self.swept, None)
        if not todo:
            self.sweeps += 1
            progress.finish(active)
            await self._report()
            return 0
        names = self.settings.topics
        done = 0
        held = list(self.store.partition_items(todo))  # keys and partitions now; states re-read below
        progress.total = len(held)
        await self._report()
        steps = iter(held)
        first = True
        while chunk := list(islice(steps, self.chunk)):
            if not first and self.pause_s:
                await asyncio.sleep(self.pause_s)  # the operator's throttle (GRADEFLOW_RULES_REGRADE_PAUSE_S)
            first = False
            async with self.writer:
                # Read under the lock: the handler cannot change these states until they are written.
                # The ruleset too: a switch (also under the lock) may have come between two chunks.
                keys = [key for key, _, _ in chunk]
                where = {key: partition for key, partition, _ in chunk}
                items = [(key, raw) for key, raw in zip(keys, self.store.get_keys(keys)) if raw is not None]
                thresholds = self.population.thresholds if self.population is not None else None
                if self.transactions is not None:
                    regraded = await self._chunk_in_transactions(items, where, thresholds)
                    done += regraded
                    progress.step(len(chunk), regraded)
                    await self._report()
                    continue
                diffs: list[tuple[bytes, bytes]] = []
                signatures: dict[bytes, tuple[Any, ...]] = {}
                changes, alerts, states = plan(self.rs, items, thresholds, self.shadows, diffs, signatures,
                                               self.promotion_id)
                if states:
                    producer = self.app.producer._ensure_producer()
                    outputs = {names.grade_changes: changes, names.alerts: alerts}
                    if self.shadows:
                        outputs[shadow_diffs_topic(self.settings)] = diffs
                        for key, sig in signatures.items():
                            self.shadow_stats.note(where[key], key, sig)
                        self.shadow_stats.records += len(diffs)
                    await publish(producer, outputs)  # before the states
                    await self.store.replace(producer, ((key, old, new, where[key])
                                                        for key, (old, new) in states.items()))
            done += len(states)
            progress.step(len(chunk), len(states))
            await self._report()
        self.regraded += done
        self.sweeps += 1
        if generation == self.generation:
            self.swept |= todo & self.active_partitions()
            progress.finish(self.swept & self.active_partitions())
        await self._report()
        if done:
            log.info("gradeflow: re-graded %d customers for ruleset %s", done, self.rs.key)
        return done

    async def _report(self) -> None:
        if self.on_progress is not None:
            try:
                await self.on_progress()
            except Exception:  # noqa: BLE001 - progress is informative: the re-grade goes on without it
                log.exception("gradeflow: reporting re-grade progress failed")

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
            diffs: list[tuple[bytes, bytes]] = []
            signatures: dict[bytes, tuple[Any, ...]] = {}
            changes, alerts, states = plan(self.rs, mine, thresholds, self.shadows, diffs, signatures,
                                           self.promotion_id)
            if not states:
                continue
            async with self.transactions.step(partition) as producer:
                if producer is None:
                    continue  # revoked meanwhile: its new owner sweeps it
                outbox = Outbox()
                outbox.extend(names.grade_changes, changes)
                outbox.extend(names.alerts, alerts)
                if self.shadows and diffs:
                    outbox.extend(shadow_diffs_topic(self.settings), diffs)
                self.store.write_many(outbox, [(key, new, partition) for key, (_old, new) in states.items()])
                await outbox.send(producer)
            if self.shadows:
                for key, sig in signatures.items():
                    self.shadow_stats.note(partition, key, sig)
                self.shadow_stats.records += len(diffs)
            done += len(states)
        return done


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
