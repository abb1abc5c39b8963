"""When time alone changes a customer's grade: the clock's pure part.

Every metric of the catalogue is a step function of the local calendar day
(in the ruleset's time zone): a bucket leaves a rolling window at a local
midnight, "days since" grows by one at each local midnight, a calendar month
starts at one. Only a minimum dwell time (hysteresis) ends at an arbitrary
instant. So a customer's grades, with no new event, can only change at a
small set of *candidate* instants, computed from their state:

- a daily bucket (purchases, interactions, paid invoices, balance flows)
  leaving each rolling window the ruleset uses: local midnight of
  bucket day + N;
- a "days since / until" metric (recency, tenure, interaction recency,
  ``days_since`` / ``days_until`` of a date attribute, oldest open invoice)
  crossing each bound the ruleset compares it with (also bound ± the
  ladder's margin, and population thresholds when known);
- the start of each calendar month / year while a calendar window is used;
- the end of a minimum dwell time;
- the scheduled re-grades a ladder declares (``regrade: {every: month_end}``).

:func:`next_change_at` evaluates the grades at the candidates in ascending
order and returns the first instant where one differs from the grade last
emitted (``state.grades``). :func:`next_wake` is the same with a budget of
evaluations, for the worker's hot path: when the budget runs out it returns
the last instant examined, marked "no change", and the worker looks again
from there. No clock is read here: callers pass the instants.

A ladder with ``regrade: {every: month_end | year_end}`` is re-graded by time
only at those instants (local midnight starting a month / a year): between
them its grade waits, as a monthly review would; its own events still
re-grade it at once. A ladder graded against the population (``top_percent``,
``{quantile: q}``) cannot be predicted (the population moves without the
customer), so its scheduled re-grades are always due; without ``regrade`` such
a ladder is predicted with the thresholds known now.
"""

from __future__ import annotations

import heapq
from functools import lru_cache
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from rules import windows
from rules.changes import Cause, decide_changes
from rules.deciders import Population, _score
from rules.engine import CompiledRuleset, _hysteresis, evaluate
from rules.ruleset import Cond, Decide, convert
from rules.state import GRADED_AT, CustomerState, graded_at, prune

CLOCK = Cause("clock", None)
BUDGET = 16  # evaluations per next_wake call (the worker looks again from where it stopped)
_ONE_US = timedelta(microseconds=1)


# ---------------------------------------------------------------- what the ruleset makes time-sensitive


@dataclass(slots=True)
class Plan:
    """Per ruleset, compiled once: which parts of a state have time-driven candidates."""

    # days metric → (bound, side) it is compared with; side: which day a comparison can flip on as
    # the counter moves past the bound (_AT_BOUND, _PAST_BOUND or _EITHER, see _flip_days)
    counters: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    rolling: dict[str, set[int]] = field(default_factory=dict)  # family → rolling window lengths
    adb_rolling: set[int] = field(default_factory=set)
    months: bool = False  # a calendar month window is used
    years: bool = False
    regrade: dict[str, str] = field(default_factory=dict)  # ladder → month_end | year_end
    relative: set[str] = field(default_factory=set)  # ladders compared against the population
    dwell: bool = False
    horizon_days: int = 0


_PLANS: dict[int, tuple[CompiledRuleset, Plan]] = {}

# On which side of a bound k a comparison of a day counter v flips. v ≥ k and v < k flip when v
# reaches k (_AT_BOUND); v ≤ k and v > k when it reaches k + 1 (_PAST_BOUND); equality, lists, a
# bound that is not a whole number of days and the population's thresholds: either (_EITHER).
# Exact sides keep the clock from looking a day early: with rfm-5 (R=5 while recency ≤ 7) and the
# at-risk horizon of 7 days, every purchase of a key customer made the customer due at once.
_EITHER, _AT_BOUND, _PAST_BOUND = 0, 1, 2
_SIDE = {"ge": _AT_BOUND, "lt": _AT_BOUND, "le": _PAST_BOUND, "gt": _PAST_BOUND}


def plan_of(rs: CompiledRuleset) -> Plan:
    held = _PLANS.get(id(rs))
    if held is not None and held[0] is rs:
        return held[1]
    p = _build_plan(rs)
    _PLANS[id(rs)] = (rs, p)
    return p


def _build_plan(rs: CompiledRuleset) -> Plan:
    p = Plan()
    src = rs.source
    defs = rs.defs or {}
    for name, _ in rs.getters:
        m = defs[name]
        if m.kind == "days" and m.window is None:
            p.counters.setdefault(name, set())
        w = m.window
        if w is None:
            continue
        if w.kind == "rolling":
            fam = "purchases" if m.family in ("legacy", "purchases") else m.family
            if fam == "balance":
                p.adb_rolling.add(w.days)
            else:
                p.rolling.setdefault(fam, set()).add(w.days)
        elif w.kind in ("month", "last_month"):
            p.months = True
        else:
            p.years = True
    if src is not None:
        def bound(metric: str, raw: Any, op: str | None = None) -> None:
            if metric is None or raw is None:
                return
            try:
                m = src.metric(metric)
            except ValueError:
                return
            if m.name not in p.counters or isinstance(raw, (dict, list)):
                return
            try:
                value = convert("days", raw, src.currency)
                k = int(value)
            except (ValueError, TypeError):
                return
            p.counters[m.name].add((k, _SIDE.get(op or "", _EITHER) if value == k else _EITHER))

        def cond(c: Cond) -> None:
            for sub in [*(c.all or ()), *(c.any or ())]:
                cond(sub)
            if c.not_ is not None:
                cond(c.not_)
            if c.metric is not None:
                for op, raw in c.ops():
                    if op not in ("exists", "in", "not_in"):
                        bound(c.metric, raw, op)
                    elif op in ("in", "not_in"):
                        for item in raw:
                            bound(c.metric, item)

        def decide(d: Decide, margin: int) -> None:
            if d.metric is not None:
                for b in d.bands or ():
                    for delta in {0, margin, -margin}:  # a margin moves the value, not the comparison
                        bound(d.metric, int(b.bound) + delta if b.bound == int(b.bound) else b.bound, b.op)
            for f in (d.scorecard or {}).values():
                for pb in f.points:
                    for op, raw in pb.ops():
                        if op not in ("exists", "in", "not_in"):
                            bound(f.metric, raw, op)
            for r in d.rules or ():
                if r.when is not None:
                    cond(r.when)
                if r.then is not None:
                    decide(r.then, 0)

        for score in src.scores.values():
            for b in score.bands:
                bound(score.metric, b.min if b.min is not None else b.max, "ge" if b.min is not None else "le")
        for name, ladder in src.ladders.items():
            h = ladder.hysteresis
            margin = int(h.margin) if h is not None and h.margin is not None and h.margin == int(h.margin) else 0
            decide(ladder.decide, margin)
            regrade = getattr(ladder, "regrade", None)
            if regrade is not None:
                p.regrade[name] = regrade.every
    for cladder in rs.ladders:
        if cladder.quantiles:
            p.relative.add(cladder.name)
        if cladder.dwell_s is not None:
            p.dwell = True
    longest_bound = max((max((k for k, _ in b), default=0) for b in p.counters.values()), default=0)
    p.horizon_days = max(rs.retention_days, longest_bound, 366) + 2
    return p


# ---------------------------------------------------------------- instants


@lru_cache(maxsize=8192)
def midnight(day: int, tz: Any) -> datetime:
    """The first instant of local day ``day`` (an ordinal) in ``tz``."""
    d = date.fromordinal(day)
    moment = datetime(d.year, d.month, d.day, tzinfo=tz)
    # Where midnight does not exist (a DST gap), the day starts at the first instant that does.
    while windows.local_day(moment, tz) < day:
        moment += timedelta(minutes=30)
    return moment


@lru_cache(maxsize=4096)
def midnight_ts(day: int, tz: Any) -> float:
    """``midnight(day, tz).timestamp()``, remembered too: ``midnight`` is cached, but ``timestamp()``
    of a ZoneInfo datetime costs about a microsecond, and the hot path asks this of every customer
    it writes when the worker runs a clock (a batch's customers share a few days)."""
    return midnight(day, tz).timestamp()


def is_boundary(moment: datetime, every: str, tz: Any) -> bool:
    """Whether ``moment`` is the instant a local month (``month_end``) or year (``year_end``) ends."""
    local = moment.astimezone(tz)
    day = local.toordinal()
    if local != midnight(day, tz):
        return False
    return local.day == 1 and (every == "month_end" or local.month == 1)


def _month_starts(first_day: int, last_day: int, years_only: bool) -> Iterable[int]:
    d = date.fromordinal(first_day)
    y, m = d.year, d.month
    while True:
        m += 1
        if m == 13:
            y, m = y + 1, 1
        start = date(y, m, 1).toordinal()
        if start > last_day:
            return
        if not years_only or m == 1:
            yield start


def _next_boundary(day: int, every: str) -> int:
    return next(iter(_month_starts(day, day + 400, every == "year_end")))


def _counter_base(name: str, state: CustomerState, tz: Any) -> tuple[int, bool] | None:
    """The local day a days-counter metric counts from, and whether it counts down to it."""
    ts: float | None
    if name == "recency_days":
        ts = state.last_purchase_ts
    elif name == "tenure_days":
        ts = state.first_purchase_ts
    elif name.startswith("interactions.recency_days"):
        parts = name.split(".")
        ts = state.last_interaction_ts if len(parts) == 2 else state.last_by_type.get(parts[2])
    elif name.startswith("days_since.") or name.startswith("days_until."):
        held = state.attrs.get(name.split(".", 1)[1])
        if held is not None and isinstance(held[1], int):
            return held[1], name.startswith("days_until.")
        return None
    elif name == "invoices.oldest_open_days":
        issued = [i for i, paid in state.invoices.values() if i is not None and paid is None]
        return (min(issued), False) if issued else None
    else:
        return None
    return None if ts is None else (windows.day_of_ts(ts, tz), False)


def _counter_bounds(name: str, bounds: set[tuple[int, int]], population: Population | None) -> set[tuple[int, int]]:
    if not population:
        return bounds
    return bounds | {(int(v) + d, _EITHER) for (metric, _), v in population.items() if metric == name
                     for d in (-1, 0, 1, 2)}


def _rolling_days(family: str, state: CustomerState) -> Iterable[int]:
    if family == "purchases":
        return state.buckets.keys()
    if family == "interactions":
        return state.ibuckets.keys()
    return [paid for _, paid in state.invoices.values() if paid is not None]  # invoices: the day each was paid


def _flip_days(base: int, falling: bool, k: int, side: int) -> tuple[int, ...]:
    """The days a comparison of a counter from ``base`` with bound ``k`` can flip on.

    Rising (days since ``base``): the counter is k on day base + k, k + 1 the day after. Falling
    (days until ``base``): it is k on day base − k and k − 1 the day after."""
    at, past = (base - k + 1, base - k) if falling else (base + k, base + k + 1)
    return (at,) if side == _AT_BOUND else (past,) if side == _PAST_BOUND else (at, past)


def candidate_days(rs: CompiledRuleset, state: CustomerState, after_day: int,
                   population: Population | None = None) -> list[int]:
    """Local days after ``after_day`` whose midnight may change a metric, ascending."""
    p = plan_of(rs)
    tz = rs.tz
    last = after_day + p.horizon_days
    days: set[int] = set()
    for name, bounds in p.counters.items():
        held = _counter_base(name, state, tz)
        if held is not None:
            days.update(d for k, side in _counter_bounds(name, bounds, population)
                        for d in _flip_days(*held, k, side) if after_day < d <= last)
    for family, lengths in p.rolling.items():
        days.update(d + n for d in _rolling_days(family, state) for n in lengths if after_day < d + n <= last)
    if p.adb_rolling and state.flows:
        end = min(last, max(state.flows) + max(p.adb_rolling))
        days.update(range(after_day + 1, end + 1))
    if p.months or p.years:
        days.update(_month_starts(after_day, last, not p.months))
    if p.regrade:
        every = set(p.regrade.values())
        days.update(_month_starts(after_day, last, "month_end" not in every))
    return sorted(days)


def first_candidate_day(rs: CompiledRuleset, state: CustomerState, after_day: int,
                        population: Population | None = None) -> int | None:
    """The first of :func:`candidate_days`, or None, without collecting them all: the hot path
    asks this of every customer it writes when the worker runs a clock (a test keeps the two equal)."""
    p = plan_of(rs)
    tz = rs.tz
    lo = after_day + 1
    best = after_day + p.horizon_days + 1  # past the last candidate: none found yet
    for name, bounds in p.counters.items():
        held = _counter_base(name, state, tz)
        if held is None:
            continue
        base, falling = held
        for k, side in _counter_bounds(name, bounds, population):
            for d in _flip_days(base, falling, k, side):
                if lo <= d < best:
                    best = d
    for family, lengths in p.rolling.items():
        for d in _rolling_days(family, state):
            for n in lengths:
                if lo <= d + n < best:
                    best = d + n
    last = after_day + p.horizon_days
    if p.adb_rolling and state.flows and min(last, max(state.flows) + max(p.adb_rolling)) >= lo:
        return lo  # nothing can come before the first day after
    if p.months or p.years:
        best = min(best, next(iter(_month_starts(after_day, last, not p.months)), best))
    if p.regrade:
        every = set(p.regrade.values())
        best = min(best, next(iter(_month_starts(after_day, last, "month_end" not in every)), best))
    return best if best <= last else None


def _dwell_ends(rs: CompiledRuleset, state: CustomerState, after: datetime) -> list[datetime]:
    out = []
    for ladder in rs.ladders:
        since = state.grade_since.get(ladder.name)
        if ladder.dwell_s is None or since is None:
            continue
        end = since + ladder.dwell_s
        moment = datetime.fromtimestamp(end, rs.tz)
        while moment.timestamp() - since < ladder.dwell_s:
            moment += _ONE_US
        if moment > after:
            out.append(moment)
    return out


# ---------------------------------------------------------------- grades at an instant


def grades_at(rs: CompiledRuleset, state: CustomerState, moment: datetime,
              population: Population | None = None) -> dict[str, str]:
    """The grades the clock would hold at ``moment`` with no new event (regrade ladders wait).

    The grades :func:`rules.engine.evaluate` decides, without building an evaluation (no
    reasons, no traces): the schedule evaluates a few instants per customer per batch."""
    day = windows.local_day(moment, rs.tz)
    ts = moment.timestamp()
    cache: dict[Any, Any] = {}
    values = {name: get(state, day, ts, cache) for name, get in rs.getters}
    scores = {score.name: _score(score, values[score.metric])[0] for score in rs.scores}
    env = (values, scores, population)
    grades: dict[str, str] = {}
    for ladder in rs.ladders:
        grade, _ = ladder.decider.decide(env)
        if ladder.dwell_s is not None or ladder.margin is not None:
            grade, _ = _hysteresis(ladder, state, moment, grade, env)
        grades[ladder.name] = grade
    return _masked(rs, state, moment, grades)


def _masked(rs: CompiledRuleset, state: CustomerState, moment: datetime, grades: dict[str, str]) -> dict[str, str]:
    regrade = plan_of(rs).regrade
    if regrade:
        for name, every in regrade.items():
            held = state.grades.get(name)
            if held is not None and not is_boundary(moment, every, rs.tz):
                grades[name] = held
    return grades


def next_wake(rs: CompiledRuleset, state: CustomerState, after: datetime, population: Population | None = None,
              budget: int | None = BUDGET) -> tuple[datetime | None, bool]:
    """The next instant to look at this customer, and whether their grade changes there.

    ``(t, True)``: time alone changes a grade at ``t`` (or a scheduled re-grade of a
    population-relative ladder is due). ``(t, False)``: ``budget`` evaluations found no
    change up to ``t``; look again from ``t``. ``(None, False)``: nothing ever changes.
    """
    if not state.grades or state.last_event_ts is None:
        return None, False
    p = plan_of(rs)
    tz = rs.tz
    after = after.astimezone(tz)
    after_day = windows.local_day(after, tz)
    forced: datetime | None = None
    for name in p.relative & set(p.regrade):
        boundary = midnight(_next_boundary(after_day, p.regrade[name]), tz)
        forced = boundary if forced is None or boundary < forced else forced
    days = candidate_days(rs, state, after_day, population)
    moments: Iterable[datetime] = (midnight(d, tz) for d in days)  # converted only as far as needed
    if p.dwell:
        moments = heapq.merge(moments, sorted(_dwell_ends(rs, state, after)))
    current = state.grades
    tried = 0
    for moment in moments:
        if moment <= after:
            continue
        if forced is not None and moment >= forced:
            return forced, True
        if budget is not None and tried >= budget:
            return moment - _ONE_US, False
        tried += 1
        grades = grades_at(rs, state, moment, population)
        if any(grades.get(k) != v for k, v in current.items()) or any(k not in current for k in grades):
            return moment, True
    return (forced, True) if forced is not None else (None, False)


def next_change_at(rs: CompiledRuleset, state: CustomerState, after: datetime,
                   population: Population | None = None) -> datetime | None:
    """The next instant strictly after ``after`` at which time alone (no new event) changes one of
    the customer's grades from those last emitted (``state.grades``), or None when none ever will.

    Population-relative ladders with a scheduled re-grade: their next re-grade is returned
    (their change cannot be foreseen). Pure: no clock, ``state`` is not modified.
    """
    moment, changed = next_wake(rs, state, after, population, budget=None)
    return moment if changed else None


# ---------------------------------------------------------------- the clock's re-grade


def regrade(customer_id: str, rs: CompiledRuleset, state: CustomerState, as_of: datetime, emitted_at: datetime,
            population: Population | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Re-grade ``state`` by time alone as of ``as_of``: the changes and alerts due (cause ``clock``,
    deterministic ids from ``as_of``). Updates the state (pruned, grades, and the instant it was
    graded as of, for a schedule rebuilt from the table)."""
    as_of = as_of.astimezone(rs.tz)
    prune(state, windows.local_day(as_of, rs.tz), rs.retention_days)
    ev = evaluate(rs, state, as_of, population)
    _masked(rs, state, as_of, ev.grades)
    since = state.grade_since if rs.tracks_since else None
    changes, alerts = decide_changes(customer_id, rs, state.grades, ev, as_of, CLOCK, emitted_at, since)
    state.ruleset = rs.key
    state.grade_since[GRADED_AT] = as_of.timestamp()
    return changes, alerts


def catch_up(customer_id: str, rs: CompiledRuleset, state: CustomerState, upto: float, emitted_at: datetime,
             population: Population | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Re-grade ``state`` by time alone at every instant after it was last graded, up to and
    including ``upto`` (seconds), where one of its grades changes: the changes and alerts due, in
    order (cause ``clock``). The state is updated only where a grade changed.

    The batch handler calls this before it applies a customer's event, with the time the
    event's partition has reached: whatever time alone did to the grade before that point is
    emitted before the event's own change, whichever of the handler and the clock's timer gets
    there first, and a replay of the same records makes the same changes with the same ids.
    """
    start = graded_at(state)
    if start is None or start >= upto or not state.grades:
        return [], []
    look = first_look(rs, state, population, after=start)
    if look is None or look > upto:
        return [], []  # the cheap lower bound: most customers stop here
    changes: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    after = datetime.fromtimestamp(start, rs.tz)
    while True:
        moment, changed = next_wake(rs, state, after, population)
        if moment is None or moment.timestamp() > upto:
            return changes, alerts
        if changed:
            out, warn = regrade(customer_id, rs, state, moment, emitted_at, population)
            changes += out
            alerts += warn
        after = moment


# ---------------------------------------------------------------- a schedule (used by the worker)


class _Due:
    """The customers due at one instant, exact or at a lower bound (see :class:`Schedule`)."""

    __slots__ = ("instant", "exact", "keys")

    def __init__(self, instant: float, exact: bool) -> None:
        self.instant = instant
        self.exact = exact
        # key → key: popping a customer gives back the key object the schedule holds, so each
        # customer's key is stored once however often it is rescheduled.
        self.keys: dict[bytes, bytes] = {}


class Schedule:
    """Due instants of customers, one per partition: customers grouped by instant.

    Most customers are due at a local midnight, so the instants are few: a heap of distinct
    instants and, per instant, the customers due then. Rescheduling moves a customer between
    groups and leaves nothing behind. (It was a heap of ``(due, key)`` with lazy deletion:
    every note of a customer left a stale entry until a rebuild, 65 MB per 100k customers
    noted ten times, against 22 MB now; docs/performance.md, "The clock's cost".)

    A due instant is *exact* (the customer's next change or warning) or a lower bound
    (``first_look``, before anyone evaluated the customer): :meth:`pop_due` says which.
    """

    __slots__ = ("of", "groups", "instants")

    def __init__(self) -> None:
        self.of: dict[bytes, _Due] = {}  # customer key → their group
        self.groups: dict[tuple[float, bool], _Due] = {}
        self.instants: list[float] = []  # heap; an instant may stay after its groups empty

    def __len__(self) -> int:
        return len(self.of)

    def get(self, key: bytes) -> float | None:
        """The due instant of ``key``, or None when they are not scheduled."""
        group = self.of.get(key)
        return None if group is None else group.instant

    def is_exact(self, key: bytes) -> bool | None:
        """Whether ``key``'s instant is exact (not a lower bound); None when they are not scheduled."""
        group = self.of.get(key)
        return None if group is None else group.exact

    def set(self, key: bytes, due: float | None, exact: bool = True) -> None:
        """Schedule ``key`` at ``due`` (None: nowhere), replacing any earlier instant."""
        old = self.of.get(key)
        if old is not None:
            if due is not None and old.instant == due and old.exact == exact:
                return
            key = old.keys.pop(key)
            if not old.keys:
                del self.groups[(old.instant, old.exact)]
            if due is None:
                del self.of[key]
                return
        elif due is None:
            return
        group = self.groups.get((due, exact))
        if group is None:
            group = self.groups[(due, exact)] = _Due(due, exact)
            heapq.heappush(self.instants, due)
            if len(self.instants) > 2 * len(self.groups) + 64:
                self.instants = sorted({g.instant for g in self.groups.values()})
        group.keys[key] = key
        self.of[key] = group

    def pop_due(self, now: float, limit: int) -> list[tuple[bytes, float, bool]]:
        """Up to ``limit`` customers due at or before ``now``, earliest first, unscheduled:
        ``(key, due, exact)``."""
        out: list[tuple[bytes, float, bool]] = []
        instants, groups, of = self.instants, self.groups, self.of
        while instants and instants[0] <= now and len(out) < limit:
            instant = instants[0]
            for exact in (False, True):
                group = groups.get((instant, exact))
                if group is None:
                    continue
                keys = group.keys
                while keys and len(out) < limit:
                    key = keys.popitem()[1]
                    del of[key]
                    out.append((key, instant, exact))
                if not keys:
                    del groups[(instant, exact)]
            if (instant, False) not in groups and (instant, True) not in groups:
                heapq.heappop(instants)
        return out

    def next_due(self) -> float | None:
        """The earliest instant anyone is due, or None."""
        instants, groups = self.instants, self.groups
        while instants and (instants[0], False) not in groups and (instants[0], True) not in groups:
            heapq.heappop(instants)
        return instants[0] if instants else None


def due_of(rs: CompiledRuleset, state: CustomerState, population: Mapping | None = None,
           after: float | None = None) -> float | None:
    """The due instant (seconds) of a stored state: its next wake after it was last graded."""
    start = graded_at(state) if after is None else after
    if start is None:
        return None
    moment, _ = next_wake(rs, state, datetime.fromtimestamp(start, rs.tz), population)
    return None if moment is None else moment.timestamp()


def first_look(rs: CompiledRuleset, state: CustomerState, population: Population | None = None,
               after: float | None = None) -> float | None:
    """A cheap lower bound of :func:`due_of` (no evaluation): the first candidate instant after the
    state was last graded, or None when time can change nothing. Looking there with
    :func:`next_wake` finds the real due instant, which is never earlier."""
    start = graded_at(state) if after is None else after
    if start is None or not state.grades:
        return None
    p = plan_of(rs)
    tz = rs.tz
    after_day = windows.day_of_ts(start, tz)
    day = first_candidate_day(rs, state, after_day, population)
    found = [midnight_ts(day, tz)] if day is not None else []
    if p.dwell:
        found += [m.timestamp() for m in _dwell_ends(rs, state, datetime.fromtimestamp(start, tz))]
    if p.regrade and p.relative:
        for name in p.relative & set(p.regrade):
            found.append(midnight(_next_boundary(after_day, p.regrade[name]), tz).timestamp())
    return min(found) if found else None
