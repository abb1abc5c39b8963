"""Shadow rulesets: candidates graded beside the active ruleset, on the same state, never published as grades.

A shadow ruleset is evaluated wherever the active one is, as of the same instant: after each event
(as of the event's ``as_of``), at each instant the clock re-grades the customer by time, and when a
new active version re-grades everyone. Its grades are kept in the customer's own state
(``CustomerState.shadow``, changelogged with the rest), so a shadow survives restarts and moves with
the customer on a rebalance, and a later promotion can start from them. They never reach
``grade-changes``, alerts or the current grades: what leaves the worker is one record per customer on
``grade-shadow-diffs`` when the customer's differences change (:func:`diff_record`).

The shadow only reads what the active ruleset keeps: a candidate that needs more (a longer window,
per-day detail, interaction days, another attribute), another time zone or currency, or grades relative
to the population is refused (:func:`problems`). Its time-driven changes follow the active's clock
and its own: :func:`catch_up` re-grades it at every instant where time alone changes one of its
grades, and :func:`next_look` tells the worker's clock when to look again.

Everything here is pure: no Kafka, Redis or wall clock (``now`` is passed in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rules import risk
from rules.changes import Cause, alert_severity, direction, grade, json_value
from rules.engine import CompiledRuleset, evaluate
from rules.schedule import catch_up as _catch_up
from rules.schedule import first_look as _lower_bound
from rules.schedule import next_wake, regrade
from rules.state import CustomerState, graded_at
from schemas import SCHEMA_VERSION

RULES = Cause("rules", None)


def problems(active: CompiledRuleset, candidate: CompiledRuleset) -> list[str]:
    """What keeps ``candidate`` from running as a shadow of ``active`` (empty: it can)."""
    found = []
    if candidate.key == active.key or candidate.version == active.version:
        found.append(f"version {candidate.version!r} is the active ruleset's ({active.key}): a shadow needs "
                     f"another version")
    if candidate.currency != active.currency:
        found.append(f"currency {candidate.currency} is not the active ruleset's ({active.currency})")
    if candidate.tz.key != active.tz.key:
        found.append(f"timezone {candidate.tz.key} is not the active ruleset's ({active.tz.key}): days are "
                     f"bucketed in the active one's")
    if candidate.quantiles:
        found.append("grades relative to the population cannot run as a shadow (the population is the "
                     "active ruleset's)")
    need, have = candidate.track, active.track
    if need.retention_days > have.retention_days:
        found.append(f"needs {need.retention_days} days of history; the active ruleset keeps "
                     f"{have.retention_days}")
    if need.detail and not have.detail:
        found.append("needs per-day purchase detail (gross, largest) that the active ruleset does not keep")
    if need.interaction_days and not have.interaction_days:
        found.append("needs interactions counted per day, which the active ruleset does not keep")
    missing = sorted(set(need.attributes) - set(have.attributes))
    if missing:
        found.append("needs attributes the active ruleset does not declare: "
                     + ", ".join(f"{n} ({k})" for n, k in missing))
    return found


def prepare(active: CompiledRuleset, candidates: list[CompiledRuleset]) -> tuple[CompiledRuleset, ...]:
    """The shadow rulesets, ready to run beside ``active``; ValueError naming every problem.

    Each runs with the active ruleset's tracking, a superset of what it needs, so that pruning the
    state as of an instant (the clock does) never drops what the active ruleset still reads."""
    errors = []
    seen: set[str] = set()
    for rs in candidates:
        if rs.key in seen:
            errors.append(f"{rs.key}: given twice")
        seen.add(rs.key)
        errors += [f"{rs.key}: {p}" for p in problems(active, rs)]
    if errors:
        raise ValueError("; ".join(errors))
    return tuple(dataclasses.replace(rs, track=active.track) for rs in candidates)


# ---------------------------------------------------------------- the customer's shadow grades


@contextmanager
def view(state: CustomerState, rs: CompiledRuleset) -> Iterator[CustomerState]:
    """``state`` as the shadow ``rs`` sees it: its own last grades and their times (hysteresis, the
    instant it was last graded by time) in place of the active ruleset's, for as long as the block
    runs. The engine's functions then grade the shadow exactly as they grade the active ruleset."""
    entry = state.shadow.get(rs.key)
    if entry is None:
        entry = state.shadow[rs.key] = {"g": {}, "s": {}, "at": None}
    saved = state.grades, state.grade_since, state.ruleset, state.warned
    state.grades, state.grade_since, state.warned = entry["g"], entry["s"], {}
    try:
        yield state
    finally:
        state.grades, state.grade_since, state.ruleset, state.warned = saved


def _followed(state: CustomerState, rs: CompiledRuleset) -> None:
    state.shadow[rs.key]["at"] = graded_at(state)


def signature(shadows: tuple[CompiledRuleset, ...], state: CustomerState) -> tuple[Any, ...]:
    """What a customer's ``grade-shadow-diffs`` record says (a new record is due when it changes):
    per shadow, None before its first evaluation, else each of its ladders' active and shadow grades.
    The active grades are part of it, so the topic alone holds every followed customer's current
    pair of grades, the unchanged ones too (what the blast radius's diagonal counts)."""
    out: list[Any] = []
    for rs in shadows:
        entry = state.shadow.get(rs.key)
        if entry is None or entry.get("at") is None:
            out.append(None)
            continue
        mine = entry["g"]
        out.append(tuple((lad.name, state.grades.get(lad.name), mine.get(lad.name)) for lad in rs.ladders))
    return tuple(out)


def differs(sig: tuple[Any, ...]) -> bool:
    """Whether a :func:`signature` has a shadow grade that differs from the active one."""
    return any(entry is not None and any(a != b for _, a, b in entry) for entry in sig)


def follow_event(shadows: tuple[CompiledRuleset, ...], customer_id: str, state: CustomerState, as_of: datetime,
                 as_of_ts: float, cause: Cause, now: datetime) -> None:
    """Grade each shadow as the active ruleset was just graded: as of ``as_of``, after an event."""
    for rs in shadows:
        with view(state, rs) as v:
            grade(customer_id, rs, v, as_of, cause, now, None, as_of_ts)
        _followed(state, rs)


def catch_up(shadows: tuple[CompiledRuleset, ...], customer_id: str, state: CustomerState, upto: float,
             now: datetime) -> None:
    """Re-grade each shadow by time alone up to ``upto`` (seconds), at every instant where time
    changes one of its grades (as :func:`rules.schedule.catch_up` does for the active ruleset)."""
    for rs in shadows:
        with view(state, rs) as v:
            _catch_up(customer_id, rs, v, upto, now)


def follow_clock(shadows: tuple[CompiledRuleset, ...], customer_id: str, state: CustomerState, moment: datetime,
                 now: datetime) -> None:
    """Grade each shadow as the clock just re-graded the active ruleset: by time, as of ``moment``
    (its own changes by time before it first)."""
    ts = moment.timestamp()
    for rs in shadows:
        with view(state, rs) as v:
            if v.grades:
                _catch_up(customer_id, rs, v, ts, now)
                regrade(customer_id, rs, v, moment, now)
            else:
                grade(customer_id, rs, v, moment, Cause("clock", None), now, None, ts)
        _followed(state, rs)


def follow_rules(shadows: tuple[CompiledRuleset, ...], customer_id: str, state: CustomerState,
                 now: datetime) -> bool:
    """Grade each shadow not yet following the active grades (a new shadow, or the active ruleset
    moved past it while it did not run) as of the instant the state was graded; whether any was."""
    at = graded_at(state)
    if at is None:
        return False
    done = False
    for rs in shadows:
        entry = state.shadow.get(rs.key)
        followed = entry.get("at") if entry is not None else None
        if followed is not None and followed >= at:
            continue  # it followed the ruleset up to this instant (or a clock instant past it)
        with view(state, rs) as v:
            grade(customer_id, rs, v, datetime.fromtimestamp(at, rs.tz), RULES, now, None, at)
        _followed(state, rs)
        done = True
    return done


def forget_others(shadows: tuple[CompiledRuleset, ...], state: CustomerState) -> None:
    """Drop the grades of shadows no longer configured."""
    if state.shadow:
        keep = {rs.key for rs in shadows}
        for key in [k for k in state.shadow if k not in keep]:
            del state.shadow[key]


def next_look(shadows: tuple[CompiledRuleset, ...], state: CustomerState, after: float) -> float | None:
    """The next instant after ``after`` (seconds) the clock must look at the customer for a shadow's
    sake (a lower bound or an exact change), or None when time alone changes no shadow grade."""
    found: float | None = None
    for rs in shadows:
        with view(state, rs) as v:
            if not v.grades:
                continue
            moment, _changed = next_wake(rs, v, datetime.fromtimestamp(after, rs.tz))
        if moment is not None:
            found = risk.earliest(found, moment.timestamp())
    return found


def first_look(shadows: tuple[CompiledRuleset, ...], state: CustomerState) -> float | None:
    """A cheap lower bound of :func:`next_look` from where each shadow was last graded."""
    found: float | None = None
    for rs in shadows:
        with view(state, rs) as v:
            if not v.grades:
                continue
            start = graded_at(v)
            found = risk.earliest(found, _lower_bound(rs, v, None, after=start))
    return found


# ---------------------------------------------------------------- the grade-shadow-diffs record


def differences(rs: CompiledRuleset, active: dict[str, str], shadow: dict[str, str]) -> list[dict[str, Any]]:
    """Per ladder of ``rs`` where the shadow grade differs from the active one: from, to, the
    direction a promotion would move the customer, and the alert it would raise (severity or None)."""
    out = []
    for ladder in rs.ladders:
        old, new = active.get(ladder.name), shadow.get(ladder.name)
        if new is None or old == new:
            continue
        way = direction(ladder, old, new)
        out.append({"ladder": ladder.name, "from": old, "to": new, "direction": way,
                    "alert": alert_severity(ladder, old, new) if way == "downgrade" else None})
    return out


def diff_record(active: CompiledRuleset, shadows: tuple[CompiledRuleset, ...], customer_id: str,
                state: CustomerState, emitted_at: datetime) -> dict[str, Any]:
    """The customer's ``grade-shadow-diffs`` document (schemas.shadow.ShadowDiff): the active grades
    and, per shadow, its grades and each difference with the candidate's metrics and reasons."""
    at = graded_at(state)
    out: list[dict[str, Any]] = []
    for rs in shadows:
        entry = state.shadow.get(rs.key)
        if entry is None or entry.get("at") is None:
            continue
        found = differences(rs, state.grades, entry["g"])
        with view(state, rs) as v:
            mine = graded_at(v)  # later than the active's when time alone moved the shadow since
            if found:
                ev = evaluate(rs, v, datetime.fromtimestamp(mine or 0.0, rs.tz))
                for d in found:
                    lad = next(x for x in rs.ladders if x.name == d["ladder"])
                    d["values"] = {n: json_value(rs, n, ev.values.get(n)) for n in lad.metrics}
                    d["reasons"] = ev.reasons[lad.name]
        out.append({"ruleset": {"id": rs.id, "version": rs.version}, "grades": dict(entry["g"]),
                    "as_of": datetime.fromtimestamp(mine, rs.tz).isoformat() if mine is not None else None,
                    "differences": found})
    return {
        "schema_version": SCHEMA_VERSION,
        "customer_id": customer_id,
        "ruleset": {"id": active.id, "version": active.version},
        "grades": dict(state.grades),
        "as_of": datetime.fromtimestamp(at, active.tz).isoformat() if at is not None else None,
        "differs": any(s["differences"] for s in out),
        "shadows": out,
        "emitted_at": emitted_at.isoformat(),
    }
