"""Shadow rulesets in the worker: loading them, following every customer, counting who differs.

The grading itself is pure (rules/shadow.py) and runs inside the writers of state: the batch
handler (:func:`streams.processor.process_batch`), the clock's wakes (streams/clock.py) and the
rules sweep (streams/rules_start.py). What is here:

- :func:`load_shadows`: ``GRADEFLOW_SHADOW_RULESETS`` read and checked against the active ruleset
  at start (a bad file is refused as ``GRADEFLOW_RULESET`` is, naming file, path and problem);
- :class:`ShadowSweep`: after each rebalance's recovery, every customer of the worker's partitions
  whose shadows do not follow the active grades yet (a shadow just configured, or the active
  ruleset moved while no shadow ran) is graded by the shadows as of the instant the active ruleset
  graded it, and its record published; the same pass counts the customers that differ;
- the ``gradeflow_shadow_*`` metrics.

Without shadow rulesets none of this is attached and the hot path runs no shadow code.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import islice
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rules import shadow
from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import load
from rules.state import CustomerState
from schemas.errors import ConfigurationError, RulesetError
from streams.faustext.outbox import publish
from streams.processor import utcnow
from streams.rules_start import CoalescedSweep
from streams.settings import shadow_diffs_topic, shadow_ruleset_names

log = logging.getLogger("gradeflow.shadow")
CHUNK = 500


def load_shadows(settings: Any, active: CompiledRuleset) -> tuple[CompiledRuleset, ...]:
    """The shadow rulesets of ``GRADEFLOW_SHADOW_RULESETS``, compiled and checked against ``active``.

    A file that is not a valid ruleset raises :class:`schemas.errors.RulesetError` (file, path,
    what is wrong); one that cannot run beside ``active`` raises ConfigurationError naming the setting."""
    compiled = []
    for name in shadow_ruleset_names(settings):
        try:
            compiled.append(compile_ruleset(load(name)))
        except RulesetError as exc:
            raise RulesetError(f"{exc.source} (GRADEFLOW_SHADOW_RULESETS)", exc.problems) from None
    try:
        return shadow.prepare(active, compiled)
    except ValueError as exc:
        raise ConfigurationError(f"GRADEFLOW_SHADOW_RULESETS: {exc}") from None


class ShadowStats:
    """The worker's shadow counters, and the customers that differ, per input partition it owns."""

    def __init__(self, shadows: tuple[CompiledRuleset, ...]) -> None:
        self.shadows = shadows
        # input partition → customer key → the keys of the shadows that differ for that customer
        self.differing: dict[int, dict[bytes, tuple[str, ...]]] = {}
        self.records = 0  # grade-shadow-diffs records published
        self.followed = 0  # customers the sweep graded by the shadows
        self.sweeps = 0

    def note(self, partition: int, key: bytes, sig: tuple[Any, ...]) -> None:
        """Record a customer's :func:`rules.shadow.signature` as just written."""
        which = tuple(rs.key for rs, entry in zip(self.shadows, sig)
                      if entry is not None and any(a != b for _, a, b in entry))
        held = self.differing.setdefault(partition, {})
        if which:
            held[key] = which
        else:
            held.pop(key, None)

    def note_batch(self, signatures: dict[str, tuple[Any, ...]], states: dict[str, tuple[bytes, Any]]) -> None:
        """The handler's batch: ``BatchResult.shadow_signatures`` and ``BatchResult.states``."""
        for customer_id, sig in signatures.items():
            self.note(states[customer_id][1].partition, customer_id.encode(), sig)

    def keep(self, partitions: set[int]) -> None:
        """Forget the partitions this worker no longer owns."""
        for p in [p for p in self.differing if p not in partitions]:
            del self.differing[p]

    def counts(self) -> dict[str, int]:
        """Shadow ruleset key → customers of this worker whose grade under it differs from the active one."""
        out = {rs.key: 0 for rs in self.shadows}
        for held in self.differing.values():
            for which in held.values():
                for key in which:
                    out[key] += 1
        return out


class ShadowCollector:
    """The ``gradeflow_shadow_*`` metrics of a worker with shadow rulesets (none without)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        stats = getattr(self.app, "gradeflow_shadow", None)
        if stats is None:
            return
        gauge = GaugeMetricFamily(
            "gradeflow_shadow_differing_customers",
            "Customers of this worker's partitions whose grade under a shadow ruleset differs from the active "
            "one (summed over workers: the whole population).", labels=["ruleset"])
        for key, n in sorted(stats.counts().items()):
            gauge.add_metric([key], n)
        yield gauge
        yield CounterMetricFamily("gradeflow_shadow_records", "Records published on the grade-shadow-diffs topic.",
                                  value=stats.records)


def plan(active: CompiledRuleset, shadows: tuple[CompiledRuleset, ...], items: list[tuple[bytes, bytes]]
         ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, tuple[bytes, bytes]], dict[bytes, tuple[Any, ...]]]:
    """Pure step of a sweep: for (key, state bytes) pairs, the grade-shadow-diffs records and new states
    due, and every customer's signature (customers the active ruleset graded with another version are
    left to the rules sweep, which grades their shadows with them)."""
    now = utcnow()
    records: list[tuple[bytes, bytes]] = []
    states: dict[bytes, tuple[bytes, bytes]] = {}
    signatures: dict[bytes, tuple[Any, ...]] = {}
    for key, raw in items:
        state = CustomerState.from_bytes(raw)
        if state.merged_into is not None or (state.ruleset is not None and state.ruleset != active.key):
            continue
        before = shadow.signature(shadows, state)
        stale = bool(set(state.shadow) - {rs.key for rs in shadows})
        shadow.forget_others(shadows, state)
        if shadow.follow_rules(shadows, key.decode(), state, now) or stale:
            states[key] = (raw, state.to_bytes())
        after = signatures[key] = shadow.signature(shadows, state)
        if after != before:
            records.append((key, orjson.dumps(shadow.diff_record(active, shadows, key.decode(), state, now))))
    return records, states, signatures


class ShadowSweep(CoalescedSweep):
    """After each recovery: the shadows follow every customer of the worker's partitions."""

    failure = "gradeflow: the shadow sweep failed"

    def __init__(self, app: Any, settings: Any, active: CompiledRuleset, shadows: tuple[CompiledRuleset, ...],
                 store: Any, stats: ShadowStats, writer: asyncio.Lock) -> None:
        super().__init__()
        self.app, self.settings, self.active, self.shadows = app, settings, active, shadows
        self.store, self.stats, self.writer = store, stats, writer
        self.topic = shadow_diffs_topic(settings)

    def active_partitions(self) -> set[int]:
        inputs = self.settings.topics.transactions
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == inputs}

    async def sweep(self) -> int:
        active = self.active_partitions()
        self.stats.keep(active)
        done = 0
        held = iter(list(self.store.partition_items(active)))
        while chunk := list(islice(held, CHUNK)):
            async with self.writer:
                keys = [key for key, _, _ in chunk]
                where = {key: partition for key, partition, _ in chunk}
                items = [(key, raw) for key, raw in zip(keys, self.store.get_keys(keys)) if raw is not None]
                records, states, signatures = plan(self.active, self.shadows, items)
                if records or states:
                    producer = self.app.producer._ensure_producer()
                    await publish(producer, {self.topic: records})  # before the states that record them
                    await self.store.replace(producer, ((key, old, new, where[key])
                                                        for key, (old, new) in states.items()))
                for key, sig in signatures.items():
                    self.stats.note(where[key], key, sig)
                self.stats.records += len(records)
            done += len(states)
            await asyncio.sleep(0)
        self.stats.followed += done
        self.stats.sweeps += 1
        if done:
            log.info("gradeflow: shadow rulesets %s now follow %d more customers",
                     ", ".join(rs.key for rs in self.shadows), done)
        return done


def attach_shadow(app: Any, settings: Any, active: CompiledRuleset, shadows: tuple[CompiledRuleset, ...],
                  store: Any, writer: asyncio.Lock) -> ShadowStats | None:
    """Wire the shadow rulesets into the worker (None, and nothing attached, without any)."""
    if not shadows:
        return None
    stats = ShadowStats(shadows)
    sweep = ShadowSweep(app, settings, active, shadows, store, stats, writer)
    app.gradeflow_shadow = stats
    app.gradeflow_shadow_sweep = sweep
    regrade = getattr(app, "gradeflow_rules_regrade", None)
    if regrade is not None:  # a new active version re-grades customers: their shadows follow there
        regrade.shadows, regrade.shadow_stats = shadows, stats
    tasks: set[asyncio.Task] = set()

    @app.on_rebalance_complete.connect
    async def _after_recovery(sender: Any = None, **kwargs: Any) -> None:
        task = asyncio.ensure_future(sweep.run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return stats


def beside(active: CompiledRuleset, shadows: tuple[CompiledRuleset, ...]) -> tuple[tuple[CompiledRuleset, ...], list[str]]:
    """The shadows that can still run beside ``active`` after a promotion or rollback made it the
    active ruleset, and why each other one cannot (a promoted shadow is the active ruleset now)."""
    kept: list[CompiledRuleset] = []
    dropped: list[str] = []
    for rs in shadows:
        found = shadow.problems(active, rs)
        if found:
            dropped.append(f"{rs.key}: {'; '.join(found)}")
        else:
            kept.append(rs)
    return tuple(kept), dropped


def switch_active(app: Any, active: CompiledRuleset, grader: Any, clock: Any, regrade: Any) -> None:
    """Retarget the worker's shadows to a new active ruleset (under the writer lock): the ones that
    cannot run beside it stop, with a log line; the state's grades of a stopped one are dropped
    the next time its customer is written (:func:`rules.shadow.forget_others`)."""
    sweep = getattr(app, "gradeflow_shadow_sweep", None)
    if sweep is None:
        return
    kept, dropped = beside(active, sweep.shadows)
    for why in dropped:
        log.warning("gradeflow: shadow ruleset %s stops beside the active %s", why, active.key)
    sweep.active, sweep.shadows = active, kept
    for holder in (grader, clock, regrade):
        if holder is not None and hasattr(holder, "shadows"):
            holder.shadows = kept
