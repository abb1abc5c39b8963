"""At-risk warnings: a key customer whose grade time alone will lower within a horizon.

The pure part of the at-risk warning, built on the clock's schedule
(:mod:`rules.schedule`): given a customer's state and the clock's instant
``now``, :func:`scan` follows the grades time alone would give, change after
change (``next_wake``), and finds, per ladder, the first instant ``T`` at which
a ladder that holds a key grade drops to a lower grade. When ``T - now`` is at
most the horizon, :func:`warnings` returns one alert for it (kind ``at_risk``
on ``grade-alerts``), so that an account manager can call before the
downgrade.

One warning per drop: the state remembers, per ladder, the instant ``T`` it
warned about (``CustomerState.warned``), so neither the next wake, a restart
nor a rebalance repeats it; when the customer buys meanwhile and ``T`` moves,
the new ``T`` gets its warning when it enters the horizon. Ids are
deterministic (customer, ladder, ruleset, ``T``, grade now, grade at ``T``), so a
warning re-emitted after a crash (before its state was written) has the same
id and the alert dispatcher delivers it once.

``as_of`` of a warning is the instant it became due, ``max(T - horizon, the
instant the state was last graded as of)``, not the instant a worker happened
to look: a replay gives the same document. ``due_at`` is ``T``.
``grade_change_event_id`` is the id the clock's downgrade at ``T`` will carry
if it happens as predicted (rules.changes.change_id), so a consumer can tie the
warning to the downgrade that follows it (or to its absence).

No clock is read here: callers pass the instants.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rules.changes import _NAMESPACE, change_id
from rules.deciders import Population
from rules.engine import CompiledLadder, CompiledRuleset, evaluate
from rules.schedule import CLOCK, first_look as _first_look, grades_at, next_wake
from rules.state import CustomerState, graded_at
from schemas import SCHEMA_VERSION

_ONE_US = timedelta(microseconds=1)
SEVERITY = "info"


@dataclass(slots=True, frozen=True)
class Drop:
    """Time alone lowers ``ladder`` from the key grade ``grade`` to ``to`` at ``at``."""

    ladder: str
    grade: str
    to: str
    at: datetime
    grades: dict[str, str]  # the grades of every ladder just before ``at`` (as the clock would hold them)


def _key_ladders(rs: CompiledRuleset, grades: dict[str, str]) -> list[CompiledLadder]:
    return [lad for lad in rs.ladders if lad.key and grades.get(lad.name) in lad.key]


def is_key(rs: CompiledRuleset, state: CustomerState) -> bool:
    """Whether the customer holds a key grade on some ladder (only such customers are warned)."""
    return bool(_key_ladders(rs, state.grades))


def scan(rs: CompiledRuleset, state: CustomerState, now: datetime, horizon: timedelta,
         population: Population | None = None,
         first: tuple[datetime | None, bool] | None = None) -> tuple[list[Drop], datetime | None]:
    """Drops from a key grade that time alone makes in ``(now, now + horizon]`` (the first of each
    ladder), and the instant to look again: when the next drop after that enters the horizon (or
    a lower bound of it: look again then), or None when no later drop can come.

    ``state`` must be graded up to ``now`` (every change time makes at or before ``now`` applied);
    it is not modified. Evaluations: those ``next_wake`` makes over the candidate instants up to
    ``now + horizon``, plus one budget (rules.schedule.BUDGET) beyond. ``first``: what
    ``next_wake(rs, state, t)`` returned for an instant ``t <= now`` the state is graded up to, when
    the caller has it and it lies after ``now`` (the worker's: saves that evaluation)."""
    if horizon <= timedelta(0) or not _key_ladders(rs, state.grades):
        return [], None
    now = now.astimezone(rs.tz)
    end = now + horizon
    sim = copy.copy(state)  # grades and grade_since are replaced, the rest is only read
    sim.grades = dict(state.grades)
    sim.grade_since = dict(state.grade_since)
    drops: dict[str, Drop] = {}
    after = now
    if first is not None and first[0] is not None and first[0] <= now:
        first = None
    while True:
        beyond = after >= end
        if first is not None:
            (moment, changed), first = first, None
        else:
            moment, changed = next_wake(rs, sim, after, population)
        if moment is None:
            return list(drops.values()), None
        if not changed:
            if moment >= end:
                return list(drops.values()), moment - horizon  # nothing up to moment: look again then
            after = moment
            continue
        grades = grades_at(rs, sim, moment, population)
        dropped = False
        for ladder in _key_ladders(rs, sim.grades):
            held, to = sim.grades[ladder.name], grades.get(ladder.name, sim.grades[ladder.name])
            if to != held and ladder.rank.get(to, len(ladder.rank)) > ladder.rank.get(held, 0):
                dropped = True
                if moment <= end and ladder.name not in drops:
                    drops[ladder.name] = Drop(ladder.name, held, to, moment, dict(sim.grades))
        if moment > end and (dropped or beyond):
            # The first drop beyond the horizon (or a change past it: a lower bound of the next drop).
            return list(drops.values()), moment - horizon
        if rs.tracks_since:
            for name, grade in grades.items():
                if sim.grades.get(name) != grade:
                    sim.grade_since[name] = moment.timestamp()
        sim.grades = dict(grades)
        if not _key_ladders(rs, sim.grades):
            return list(drops.values()), None  # no key grade left: nothing more to warn about
        after = moment


def warning_id(customer_id: str, rs: CompiledRuleset, drop: Drop) -> str:
    """Deterministic id of the warning about ``drop``."""
    name = (f"at-risk\x1f{customer_id}\x1f{drop.ladder}\x1f{rs.id}@{rs.version}\x1f"
            f"{drop.at.isoformat()}\x1f{drop.grade}\x1f{drop.to}")
    return str(uuid.uuid5(_NAMESPACE, name))


def dedup_key(ladder: str, customer_id: str) -> str:
    """The at-risk warning's ``dedup_key`` (distinct from the downgrade's ``…/key-downgrade``)."""
    return f"gradeflow/{ladder}/{customer_id}/at-risk"


def what_changes(rs: CompiledRuleset, state: CustomerState, drop: Drop,
                 population: Population | None = None) -> list[str]:
    """The sentences of the ladder's reasons that time changes at the drop (as of ``drop.at``)."""
    snap = copy.copy(state)
    snap.grades = dict(drop.grades)
    before = evaluate(rs, snap, drop.at - _ONE_US, population).reasons[drop.ladder]
    after = evaluate(rs, snap, drop.at, population).reasons[drop.ladder]
    return [line for line in after if line not in before] or after


def alert_of(customer_id: str, rs: CompiledRuleset, state: CustomerState, drop: Drop, as_of: datetime,
             severity: str = SEVERITY, population: Population | None = None) -> dict[str, Any]:
    """The ``grade-alerts`` document of an at-risk warning (schemas.events.Alert, kind ``at_risk``)."""
    ladder = next(lad for lad in rs.ladders if lad.name == drop.ladder)
    at = drop.at.astimezone(rs.tz)
    left = drop.to not in ladder.key
    what = "would no longer be a key customer" if left else "would drop within the key grades"
    when = f"{at:%Y-%m-%d %H:%M} ({rs.tz})"
    summary = (f"Customer {customer_id} is at risk on ladder '{drop.ladder}': with no new activity they {what} "
               f"on {when}: {drop.grade} → {drop.to}. Then: " + " ".join(what_changes(rs, state, drop, population)))
    return {
        "schema_version": SCHEMA_VERSION,
        "alert_id": warning_id(customer_id, rs, drop),
        "customer_id": customer_id,
        "ladder": drop.ladder,
        "severity": severity,
        "summary": summary,
        "previous_grade": drop.grade,
        "grade": drop.to,
        "grade_change_event_id": change_id(customer_id, drop.ladder, rs, CLOCK, at, drop.grade, drop.to),
        "as_of": as_of.astimezone(rs.tz).isoformat(),
        "dedup_key": dedup_key(drop.ladder, customer_id),
        "kind": "at_risk",
        "due_at": at.isoformat(),
        "cause": {"kind": "clock", "event_id": None},
    }


def warnings(customer_id: str, rs: CompiledRuleset, state: CustomerState, now: datetime, horizon: timedelta,
             population: Population | None = None, severity: str = SEVERITY,
             first: tuple[datetime | None, bool] | None = None) -> tuple[list[dict[str, Any]], datetime | None]:
    """The at-risk warnings due at ``now`` (one per ladder and drop instant, never one already
    emitted for the same instant) and the instant to look again (see :func:`scan`).

    Records each warning in ``state.warned`` (ladder → drop instant) and forgets marks whose
    instant has passed; the caller writes the state when warnings were returned."""
    drops, look = scan(rs, state, now, horizon, population, first)
    if not drops:
        return [], look
    for name in [n for n, t in state.warned.items() if t <= now.timestamp()]:
        del state.warned[name]
    start = graded_at(state)
    out = []
    for drop in drops:
        t = drop.at.timestamp()
        if state.warned.get(drop.ladder) == t:
            continue
        due = drop.at - horizon
        if start is not None:
            due = max(due, datetime.fromtimestamp(start, rs.tz))
        out.append(alert_of(customer_id, rs, state, drop, due, severity, population))
        state.warned[drop.ladder] = t
    return out, look


def first_look(rs: CompiledRuleset, state: CustomerState, horizon: timedelta,
               population: Population | None = None) -> float | None:
    """A cheap lower bound (seconds) of the next instant the clock must look at this customer: for a
    key customer, the first candidate instant minus the horizon (a drop can come no earlier than the
    first candidate, and its warning is due a horizon before it); else rules.schedule.first_look."""
    bound = _first_look(rs, state, population)
    if bound is None or not horizon or not is_key(rs, state):  # a zero horizon: no warnings
        return bound
    return bound - horizon.total_seconds()


def earliest(*instants: float | None) -> float | None:
    found: Iterable[float] = [t for t in instants if t is not None]
    return min(found, default=None)
