"""The clock: re-grade customers when time alone changes their grade (cause ``clock``).

See docs/clock.md. For each customer, :mod:`rules.schedule` computes the next
instant at which time alone can change a grade (its *due* instant). The worker
keeps, per input partition it owns, a schedule of due customers:

- rebuilt from the table after every rebalance's recovery, for the worker's
  active partitions only (so with several workers each customer is woken by
  exactly one of them);
- updated after every batch for the customers the batch touched: the hot path
  computes each one's first look while their state is decoded anyway, the
  handler notes them (:meth:`Clock.note`), the timer schedules them;
- every ``clock_tick_s`` a timer pops the customers whose due instant the
  partition's clock has reached and re-grades each *as of its due instant* (so the
  change's ``as_of`` and its deterministic ``event_id`` do not depend on when the
  worker woke).

Ordering, by construction rather than by timing:

- **One writer at a time.** The batch handler, each wake step of the timer and
  each step of the rules sweep hold the worker's writer lock from reading states
  to writing them (outputs acknowledged in between). A wake therefore never reads
  a state the handler is about to replace, nor the handler one a wake is about to.
- **Time before events.** Before the handler applies a customer's event it first
  re-grades the customer by time up to the time the event's partition has reached
  (:func:`rules.schedule.catch_up`). Whether the timer woke the customer first or
  not, the changes are the same, in the same order; a replay after a crash makes
  them again with the same ids.
- **Never backwards.** A wake re-grades no customer as of an instant earlier than
  what the state already holds (a due instant computed before a later event is
  recomputed from the state).
- **Only recovered partitions.** Faust signals the end of a recovery before the
  handler resumes; the schedule is rebuilt then, and nobody is woken between a
  revocation and that rebuild.

Two clocks (``GRADEFLOW_CLOCK``): ``wall`` (now) and ``event`` (per partition:
the highest event time among the records of that input partition, in their
order). With the event clock the handler writes each partition's stream time to
the changelog after the batch's states (:func:`stream_key`), so that a worker
that takes the partition over resumes from the same time the states hold, and
places the clock's changes among the records exactly as the first worker did.
``off`` disables the clock.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import islice
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from collections.abc import Callable
from typing import Any

import orjson

from rules.engine import CompiledRuleset
from rules import risk, shadow
from rules.schedule import Schedule, next_wake, regrade
from rules.state import CustomerState, graded_at
from streams.faustext.outbox import Outbox, publish
from streams.processor import utcnow
from streams.faustext.tables import RESERVED
from streams.settings import shadow_diffs_topic

log = logging.getLogger("gradeflow.clock")
CHUNK = 500  # customers per step of a rebuild or of filing noted customers, between yields to the event loop
# Customers per wake step. A wake evaluates a customer at several instants (and, for a key
# customer, scans the at-risk horizon): ~0.2-1 ms each on a 2-core VM, so a step of 500 could
# hold the event loop, and the batches waiting on it, for hundreds of ms. Each step holds the writer
# lock and publishes its outputs.
WAKE_CHUNK = 32
MAX_STEPS = 32  # changes one customer may go through in one wake (one per due instant)
# A key of the state table that holds no customer: each input partition's stream time (event
# clock), under the prefix reserved for such keys.
_STREAM_TIME = RESERVED + b"stream-time/"


def stream_key(partition: int) -> bytes:
    """The state table's key holding ``partition``'s stream time (on that partition's changelog)."""
    return _STREAM_TIME + str(partition).encode()


def encode_stream_time(ts: float) -> bytes:
    return repr(float(ts)).encode()


def decode_stream_time(raw: bytes | None) -> float | None:
    return None if raw is None else float(raw.decode())


@dataclass
class ClockStats:
    woken: int = 0  # customers re-evaluated because they were due
    changes: int = 0
    alerts: int = 0
    at_risk: int = 0  # at-risk warnings emitted (also counted in alerts)
    written: int = 0  # states written by the clock
    skipped: int = 0  # states the handler changed meanwhile (rescheduled, not overwritten)
    rebuilds: int = 0
    scheduled: int = 0  # customers with a due instant, on this worker, after the last tick
    stream_time: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Clock:
    """Per-partition schedules of due customers and the timer that wakes them."""

    def __init__(self, app: Any, settings: Any, ruleset: CompiledRuleset, table: Any, store: Any,
                 writer: asyncio.Lock | None = None, wall: Callable[[], float] = time.time,
                 transactions: Any = None) -> None:
        self.app, self.settings, self.rs, self.table, self.store = app, settings, ruleset, table, store
        # With exactly_once, each wake's outputs and states go in one transaction of its partition
        # (streams/faustext/transactions.py); None: Faust's producer, outputs flushed before states.
        self.transactions = transactions
        self.wall = wall  # the wall clock (seconds); tests give their own
        # Held from reading states to writing them, by every writer of state (see the module doc).
        self.writer = writer if writer is not None else asyncio.Lock()
        self.mode = getattr(settings, "clock", "wall")
        self.idle_s: float | None = getattr(settings, "event_clock_idle_s", None)
        # At-risk warnings (rules/risk.py): a key customer is also woken a horizon before time
        # alone lowers their grade. 0 disables.
        self.horizon = timedelta(days=float(getattr(settings, "at_risk_horizon_days", 0) or 0))
        self.at_risk_severity: str = getattr(settings, "at_risk_severity", risk.SEVERITY)
        self.schedules: dict[int, Schedule] = {}
        self.stream_time: dict[int, float] = {}  # partition → highest event time of its records (event clock)
        self.advanced_at: dict[int, float] = {}  # partition → wall time its stream time last moved
        # customer key → (input partition, first look): noted, not yet scheduled
        self.pending: dict[bytes, tuple[int, float | None]] = {}
        self.active: set[int] | None = None  # None until the first recovery, and during a rebalance
        self.generation = 0
        self.started = wall()
        self.stats = ClockStats()
        self.busy = asyncio.Lock()
        # Shadow rulesets (rules/shadow.py; streams/app.py sets them): a wake grades them as of the
        # same instants as the ruleset, and the schedule also wakes a customer where time alone
        # changes a shadow grade.
        self.shadows: tuple[CompiledRuleset, ...] = ()

    # ------------------------------------------------------------ the handler's one call

    @property
    def look_horizon(self) -> timedelta | None:
        """What the handler passes to ``process_batch`` as ``clock_horizon``: None with no clock."""
        return None if self.mode == "off" else self.horizon

    def note(self, looks: dict[str, tuple[float | None, float | None]],
             states: dict[str, tuple[bytes, Any]]) -> None:
        """Queue the customers a batch just wrote: ``looks`` is ``BatchResult.looks``
        (``customer_id → (latest event time, first look)``), ``states`` gives each one's record."""
        if self.mode == "off":
            return
        pending = self.pending
        for customer_id, (_last_ts, look) in looks.items():
            pending[customer_id.encode()] = (states[customer_id][1].partition, look)

    def stream_times(self, partitions: set[int]) -> dict[int, float] | None:
        """What the handler passes to ``process_batch`` as ``stream_time``: None unless the event
        clock runs; else the stream time of each of ``partitions`` known here, read from the
        table for a partition this worker has not graded since it took it over."""
        if self.mode != "event":
            return None
        known = self.stream_time
        for partition in partitions - known.keys():
            ts = decode_stream_time(self.store.get_key(stream_key(partition)))
            if ts is not None:
                self._advance(partition, ts)
        return known

    def advanced(self, stream_time: dict[int, float]) -> list[tuple[bytes, bytes, int]]:
        """Take a batch's stream times (``BatchResult.stream_time``); return the table writes
        that record those that moved, to be written after the batch's states."""
        writes = []
        for partition, ts in stream_time.items():
            if ts > self.stream_time.get(partition, float("-inf")):
                self._advance(partition, ts)
                writes.append((stream_key(partition), encode_stream_time(ts), partition))
        return writes

    # ------------------------------------------------------------ time

    def now(self, partition: int) -> float | None:
        """The clock's time on ``partition`` (seconds), or None while it is unknown."""
        wall = self.wall()
        if self.mode == "wall":
            return wall
        t = self.stream_time.get(partition)
        if self.idle_s is not None and wall - self.advanced_at.get(partition, self.started) >= self.idle_s:
            return wall if t is None else max(t, wall)
        return t

    def _advance(self, partition: int, ts: float | None) -> None:
        if ts is not None and ts > self.stream_time.get(partition, float("-inf")):
            self.stream_time[partition] = ts
            self.advanced_at[partition] = self.wall()

    def _population(self) -> Any:
        population = getattr(self.app, "gradeflow_population", None)
        return population.thresholds if population is not None else None

    def _schedule(self, partition: int) -> Schedule:
        s = self.schedules.get(partition)
        if s is None:
            s = self.schedules[partition] = Schedule()
        return s

    # ------------------------------------------------------------ schedule upkeep

    async def absorb(self) -> int:
        """Schedule the customers noted since the last call (yielding to the event loop every
        CHUNK customers); return how many."""
        if not self.pending or self.active is None:
            return 0
        pending, self.pending = self.pending, {}
        active = self.active
        for n, (key, (partition, look)) in enumerate(pending.items(), 1):
            if partition not in active:
                continue
            if key in self.pending:
                continue  # noted again meanwhile: the newer state is scheduled next time
            # At a cheap lower bound (rules.schedule.first_look): when the clock gets there,
            # next_wake finds the real due instant.
            self._schedule(partition).set(key, look, exact=False)
            if n % CHUNK == 0:
                await asyncio.sleep(0)
                if self.active is None:
                    return n  # a rebalance began: the rebuild reads the table
        return len(pending)

    def active_partitions(self) -> set[int]:
        inputs = self.settings.topics.transactions
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == inputs}

    def revoked(self) -> None:
        """A rebalance started: wake nobody until the tables are recovered and the schedule rebuilt.
        Stream times are read again from the table: a partition may come back with another
        worker's writes."""
        self.active = None
        self.generation += 1
        self.stream_time.clear()
        self.advanced_at.clear()

    async def rebuild(self) -> None:
        """After a recovery: the schedules of exactly the active partitions, from the table."""
        generation = self.generation = self.generation + 1
        async with self.busy:
            if generation != self.generation:
                return  # another rebalance came; its rebuild follows
            active = self.active_partitions()
            rs, population = self.rs, self._population()
            schedules: dict[int, Schedule] = {p: Schedule() for p in active}
            for p in active:
                held = iter(self.store.partition_items((p,)))
                while chunk := list(islice(held, CHUNK)):
                    for key, _partition, raw in chunk:
                        state = CustomerState.from_bytes(raw)
                        if state.merged_into is not None:
                            continue  # merged into another id (streams/merging.py): nothing to grade here
                        look = risk.first_look(rs, state, self.horizon, population)
                        if self.shadows:
                            look = risk.earliest(look, shadow.first_look(self.shadows, state))
                        schedules[p].set(key, look, exact=False)
                    await asyncio.sleep(0)
                    if generation != self.generation:
                        return
            self.schedules = schedules
            self.stream_time = {p: t for p, t in self.stream_time.items() if p in active}
            if self.mode == "event":
                self.stream_times(active)
            self.active = active
            self.stats.rebuilds += 1
            log.info("gradeflow: clock (%s) schedule rebuilt for partitions %s: %d customers due some day",
                     self.mode, sorted(active), sum(len(s) for s in schedules.values()))

    # ------------------------------------------------------------ waking

    async def tick(self) -> int:
        """Wake the customers that are due on every active partition; return how many."""
        if self.mode == "off" or self.active is None or self.busy.locked():
            return 0
        async with self.busy:
            await self.absorb()
            woken = 0
            if self.active is None:
                return 0
            for partition in sorted(self.active):
                schedule = self.schedules.get(partition)
                now = self.now(partition)
                if schedule is None or now is None:
                    continue
                while self.active is not None and partition in self.active:
                    async with self.writer:
                        if self.active is None or partition not in self.active:
                            break
                        due = schedule.pop_due(now, WAKE_CHUNK)
                        if not due:
                            break
                        await self._wake(partition, schedule, due, now)
                    woken += len(due)
            self.stats.scheduled = sum(len(s) for s in self.schedules.values())
            self.stats.stream_time = dict(self.stream_time)
            return woken

    async def _wake(self, partition: int, schedule: Schedule, due: list[tuple[bytes, float, bool]],
                    now: float) -> None:
        rs, population = self.rs, self._population()
        emitted_at = utcnow()
        changes: list[tuple[bytes, bytes]] = []
        alerts: list[tuple[bytes, bytes]] = []
        writes: dict[bytes, tuple[bytes, bytes]] = {}
        later: dict[bytes, float | None] = {}
        # Rescheduled at a lower bound or at a warning's instant (not a change): look again there.
        recheck: set[bytes] = set()
        now_dt = datetime.fromtimestamp(now, rs.tz)
        warned = 0
        shadows = self.shadows
        diffs: list[tuple[bytes, bytes]] = []
        signatures: dict[bytes, tuple[Any, ...]] = {}
        for key, at, exact in due:
            raw = self.store.get_key(key)
            if raw is None:
                continue
            state = CustomerState.from_bytes(raw)
            if state.merged_into is not None:
                later[key] = None  # merged into another id (streams/merging.py): never graded here again
                continue
            if state.ruleset is not None and state.ruleset != rs.key:
                later[key] = at  # graded by another ruleset version: streams/rules_start.py first
                if not exact:
                    recheck.add(key)
                continue
            customer_id = key.decode()
            changed = False
            nxt: float | None = at
            before = (shadow.signature(shadows, state), orjson.dumps(state.shadow)) if shadows else None
            start = graded_at(state)
            if exact and start is not None and at <= start:
                # Due from an older state: the customer was graded past it since (an event, or
                # the handler's catch-up). Look again from where the state is.
                exact = False
            if not exact:
                follow, changes_there = next_wake(rs, state, datetime.fromtimestamp(start, rs.tz), population)  # type: ignore[arg-type]
                nxt = None if follow is None else follow.timestamp()
                if nxt is None or nxt > now:
                    # not due yet: now at its real due instant (or its at-risk warning's, if earlier)
                    warn = self._at_risk(customer_id, state, now_dt, now, (follow, changes_there), key, later,
                                         recheck, population)
                    if warn:
                        warned += len(warn)
                        alerts += [(key, orjson.dumps(a)) for a in warn]
                        writes[key] = (raw, state.to_bytes())
                    if before is not None:
                        signatures[key] = self._shadow_wake(customer_id, key, raw, state, before, now, emitted_at,
                                                            later, recheck, writes, diffs)
                    continue
            for _ in range(MAX_STEPS):
                moment = datetime.fromtimestamp(nxt, rs.tz)  # type: ignore[arg-type]
                out, warn = regrade(customer_id, rs, state, moment, emitted_at, population)
                if shadows:
                    shadow.follow_clock(shadows, customer_id, state, moment, emitted_at)
                if out:
                    changed = True
                    changes += [(key, orjson.dumps(c)) for c in out]
                    alerts += [(key, orjson.dumps(a)) for a in warn]
                follow, changes_there = next_wake(rs, state, moment, population)
                nxt = None if follow is None else follow.timestamp()
                if nxt is None or nxt > now:
                    break
            later[key] = nxt
            warn = []
            if nxt is None or nxt > now:  # graded up to now: warn about what comes within the horizon
                warn = self._at_risk(customer_id, state, now_dt, now, (follow, changes_there), key, later, recheck,
                                     population)
                warned += len(warn)
                alerts += [(key, orjson.dumps(a)) for a in warn]
            if changed or warn:
                writes[key] = (raw, state.to_bytes())
            if before is not None:
                signatures[key] = self._shadow_wake(customer_id, key, raw, state, before, now, emitted_at, later,
                                                    recheck, writes, diffs)
        self.stats.woken += len(due)
        names = self.settings.topics
        if self.transactions is not None:
            if changes or alerts or diffs or writes:
                # One transaction: the outputs, the states that record them, or neither. The
                # states are the ones read under the writer lock, so none is skipped.
                async with self.transactions.step(partition) as producer:
                    if producer is None:
                        return  # revoked meanwhile: the partition's new owner re-grades (same ids)
                    self._published(partition, changes, alerts, warned, len(due))
                    outbox = Outbox()
                    outbox.extend(names.grade_changes, changes)
                    outbox.extend(names.alerts, alerts)
                    if diffs:
                        outbox.extend(shadow_diffs_topic(self.settings), diffs)
                    self.store.write_many(outbox, [(key, new, partition) for key, (_old, new) in writes.items()])
                    await outbox.send(producer)
                    self.stats.written += len(writes)
        else:
            if changes or alerts or diffs:
                outputs = {names.grade_changes: changes, names.alerts: alerts}
                if diffs:
                    outputs[shadow_diffs_topic(self.settings)] = diffs
                # Outputs first, durable; then state (as the handler does).
                await publish(self.app.producer._ensure_producer(), outputs)
                self._published(partition, changes, alerts, warned, len(due))
            if writes and (self.active is None or partition not in self.active):
                return  # revoked meanwhile: the partition's new owner re-grades (same ids)
            if writes:
                await self._write(partition, writes, later)
        stats = getattr(self.app, "gradeflow_shadow", None)
        if stats is not None:
            stats.records += len(diffs)
            for key, sig in signatures.items():
                stats.note(partition, key, sig)
        for key, when in later.items():
            if key not in self.pending:  # a batch touched it meanwhile: absorb() schedules it
                schedule.set(key, when, exact=key not in recheck)

    def _shadow_wake(self, customer_id: str, key: bytes, raw: bytes, state: CustomerState,
                     before: tuple[Any, bytes], now: float, emitted_at: datetime, later: dict[bytes, float | None],
                     recheck: set[bytes], writes: dict[bytes, tuple[bytes, bytes]],
                     diffs: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
        """The shadows' part of a customer's wake, once the ruleset's is done: their own changes by
        time up to ``now``, their record if what they say changed, and the customer woken again at
        the earlier of the ruleset's next instant and theirs."""
        shadows = self.shadows
        shadow.catch_up(shadows, customer_id, state, now, emitted_at)
        after = shadow.signature(shadows, state)
        if after != before[0]:
            diffs.append((key, orjson.dumps(shadow.diff_record(self.rs, shadows, customer_id, state, emitted_at))))
        if key in writes:
            writes[key] = (raw, state.to_bytes())
        elif orjson.dumps(state.shadow) != before[1]:
            # Only the shadows moved: the ruleset's part is written as it was read, so that a shadow
            # never records an instant the ruleset's grading would not have (what a later,
            # older event is graded as of depends on it).
            kept = CustomerState.from_bytes(raw)
            kept.shadow = state.shadow
            writes[key] = (raw, kept.to_bytes())
        mine = shadow.next_look(shadows, state, now)
        if mine is not None:
            mine = max(mine, now + 1e-3)  # strictly later: never woken twice in one tick
            ours = later.get(key)
            if ours is None or mine < ours:
                later[key] = mine
                recheck.add(key)  # not the ruleset's own instant: it looks again from its state there
        return after

    def _published(self, partition: int, changes: list[tuple[bytes, bytes]], alerts: list[tuple[bytes, bytes]],
                   warned: int, woken: int) -> None:
        if not (changes or alerts):
            return
        self.stats.changes += len(changes)
        self.stats.alerts += len(alerts)
        self.stats.at_risk += warned
        log.info("gradeflow: clock woke %d customers on partition %d: %d grade changes, %d alerts "
                 "(%d at-risk warnings)", woken, partition, len(changes), len(alerts), warned)

    def _at_risk(self, customer_id: str, state: CustomerState, now_dt: datetime, now: float,
                 following: tuple[datetime | None, bool], key: bytes, later: dict[bytes, float | None],
                 recheck: set[bytes], population: Any) -> list[dict[str, Any]]:
        """The at-risk warnings of a customer graded up to ``now`` (records them in ``state``), and
        their next wake: the earlier of the next change (``following``: what next_wake found after
        the state's last grading, later than ``now``) and the next warning's instant."""
        nxt = None if following[0] is None else following[0].timestamp()
        later[key] = nxt
        if self.horizon <= timedelta(0):
            return []
        warn, look = risk.warnings(customer_id, self.rs, state, now_dt, self.horizon, population,
                                   self.at_risk_severity, following)
        if look is not None:
            when = max(look.timestamp(), now + 1e-3)  # strictly later: never woken twice in one tick
            if nxt is None or when < nxt:
                later[key] = when
                recheck.add(key)
        return warn

    async def _write(self, partition: int, writes: dict[bytes, tuple[bytes, bytes]],
                     later: dict[bytes, float | None]) -> None:
        skipped = await self.store.replace(self.app.producer._ensure_producer(),
                                           ((key, old, new, partition) for key, (old, new) in writes.items()))
        for key in skipped:
            # The handler applied an event meanwhile; its state wins and is noted for scheduling.
            later.pop(key, None)
        self.stats.skipped += len(skipped)
        self.stats.written += len(writes) - len(skipped)


def attach_clock(app: Any, settings: Any, ruleset: CompiledRuleset, table: Any, store: Any,
                 writer: asyncio.Lock | None = None, transactions: Any = None) -> Clock:
    """Create the worker's clock (``GRADEFLOW_CLOCK``), its timer and its rebuild after each recovery.

    Wiring (streams/app.py): ``clock = attach_clock(app, settings, ruleset, table, store)`` after the
    store, ``process_batch(..., clock_horizon=clock.look_horizon)`` and
    ``clock.note(result.looks, result.states)`` in the handler once the states are written.
    """
    clock = Clock(app, settings, ruleset, table, store, writer, transactions=transactions)
    app.gradeflow_clock = clock
    if clock.mode == "off":
        return clock
    tasks: set[asyncio.Task] = set()

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any = None, *args: Any, **kwargs: Any) -> None:
        clock.revoked()

    @app.on_rebalance_complete.connect
    async def _recovered(sender: Any = None, **kwargs: Any) -> None:
        task = asyncio.ensure_future(clock.rebuild())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @app.timer(interval=float(getattr(settings, "clock_tick_s", 1.0)))
    async def clock_tick() -> None:
        try:
            await clock.tick()
        except Exception:  # noqa: BLE001 - the next tick retries; grading goes on
            log.exception("gradeflow: clock tick failed")

    return clock
