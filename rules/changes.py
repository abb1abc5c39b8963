"""Grade changes and key-customer alerts, decided from an evaluation.

A grade-change event is due when, and only when, a ladder's grade differs from
the one last emitted for that customer (kept in the customer's state). Ids are
deterministic (UUID v5 of what the change is about), so a replay after a crash
re-emits the same ids and consumers can drop duplicates.
"""

from __future__ import annotations

import uuid
from hashlib import sha1
from datetime import datetime
from typing import Any

from rules.deciders import Population
from rules.engine import CompiledLadder, CompiledRuleset, Evaluation, evaluate
from rules.state import CustomerState, graded_at, prune
from rules.windows import local_day
from schemas import SCHEMA_VERSION
from schemas.money import format_minor

_NAMESPACE = uuid.UUID("6f1d3c1e-4d2b-5a7e-9c59-2f3b8f0a6a10")
_NAMESPACE_BYTES = _NAMESPACE.bytes


class Cause:
    """What made gradeflow evaluate: an input event, the clock, or new rules."""

    # A plain class, not a NamedTuple: one is built per event, and a NamedTuple's __new__ is
    # interpreted even in a compiled module (schemas/compiled.py).
    __slots__ = ("kind", "event_id", "previous")

    def __init__(self, kind: str, event_id: str | None, previous: str | None = None) -> None:
        self.kind = kind  # transaction | interaction | clock | rules | merge
        self.event_id = event_id
        # rules only: the ruleset (``id@version``) that graded the customer before
        self.previous = previous

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cause) and (self.kind, self.event_id) == (other.kind, other.event_id)

    def __hash__(self) -> int:
        return hash((self.kind, self.event_id))

    def __repr__(self) -> str:
        return f"Cause({self.kind!r}, {self.event_id!r})"


def _iso(moment: datetime) -> str:
    return moment.isoformat()


# The last ``emitted_at`` formatted: a batch passes one ``now`` for all its changes.
_emitted: list[Any] = [None, ""]


def _emitted_iso(emitted_at: datetime) -> str:
    if _emitted[0] is not emitted_at:
        _emitted[1] = emitted_at.isoformat()
        _emitted[0] = emitted_at
    return _emitted[1]


def uuid5(name: str) -> str:
    """``str(uuid.uuid5(_NAMESPACE, name))``, without building UUID objects (a third of a change's cost)."""
    d = bytearray(sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50  # version 5
    d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def change_id(customer_id: str, ladder: str, rs: CompiledRuleset, cause: Cause, as_of: datetime,
              previous: str | None, grade: str) -> str:
    """Deterministic id of one grade change."""
    origin = cause.event_id if cause.event_id is not None else _iso(as_of)
    return uuid5(f"{customer_id}\x1f{ladder}\x1f{rs.id}@{rs.version}\x1f{cause.kind}\x1f{origin}\x1f{previous}\x1f{grade}")


def _direction(ladder: CompiledLadder, previous: str | None, grade: str) -> str:
    if previous is None or previous not in ladder.rank:
        return "initial"
    return "upgrade" if ladder.rank[grade] < ladder.rank[previous] else "downgrade"


def direction(ladder: CompiledLadder, previous: str | None, grade: str) -> str:
    """``initial``, ``upgrade`` or ``downgrade``: how moving from ``previous`` to ``grade`` reads on ``ladder``."""
    return _direction(ladder, previous, grade)


def alert_severity(ladder: CompiledLadder, previous: str | None, grade: str) -> str | None:
    """The severity of the alert a downgrade from ``previous`` to ``grade`` raises, or None: only a
    drop out of or within the ladder's key grades alerts."""
    if previous not in ladder.key:
        return None
    # Leaving the key grades altogether is what on-call must act on now; a
    # step down inside them (S → A) is worth knowing but not waking for.
    return "critical" if grade not in ladder.key else "warning"


def _alert(customer_id: str, ladder: CompiledLadder, change: dict[str, Any], as_of: datetime) -> dict[str, Any] | None:
    previous = change["previous_grade"]
    grade = change["grade"]
    if change["direction"] != "downgrade" or previous not in ladder.key:
        return None
    left_key = grade not in ladder.key
    severity = alert_severity(ladder, previous, grade)
    verb = "is no longer a key customer" if left_key else "dropped within the key grades"
    return {
        "schema_version": SCHEMA_VERSION,
        "alert_id": uuid5("alert\x1f" + change["event_id"]),
        "customer_id": customer_id,
        "ladder": ladder.name,
        "severity": severity,
        "summary": f"Customer {customer_id} {verb} on ladder '{ladder.name}': {previous} → {grade}. "
                   + " ".join(change["reasons"]),
        "previous_grade": previous,
        "grade": grade,
        "grade_change_event_id": change["event_id"],
        "as_of": _iso(as_of),
        "dedup_key": f"gradeflow/{ladder.name}/{customer_id}/key-downgrade",
        # What made it, so the storm guard can fold pages by cause without reading grade-changes.
        "cause": change["cause"],
    }


def _cause(cause: Cause) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": cause.kind, "event_id": cause.event_id}
    if cause.previous is not None:
        rid, _, version = cause.previous.rpartition("@")
        out["previous_ruleset"] = {"id": rid, "version": version}
    return out


def metrics_of(rs: CompiledRuleset, ev: Evaluation, ladder: CompiledLadder) -> dict[str, Any]:
    """The ``metrics`` object of a grade change on ``ladder`` (schemas.events.Metrics)."""
    return {
        "recency_days": ev.recency_days,
        "frequency": ev.frequency,
        "monetary": format_minor(ev.monetary_minor, rs.currency),
        "r": ev.scores.get("r", 0),
        "f": ev.scores.get("f", 0),
        "m": ev.scores.get("m", 0),
        "code": ev.code,
        "values": {name: json_value(rs, name, ev.values.get(name)) for name in ladder.metrics},
    }


def json_value(rs: CompiledRuleset, name: str, value: Any) -> Any:
    """A metric value as the grade-change's ``metrics.values`` carries it: money as a decimal string."""
    if value is None:
        return None
    kind = rs.defs[name].kind if rs.defs is not None and name in rs.defs else "count"
    if kind == "money":
        return format_minor(int(value), rs.currency)
    if kind == "date":
        from datetime import date

        return date.fromordinal(value).isoformat()
    return value


def decide_changes(customer_id: str, rs: CompiledRuleset, grades: dict[str, str], ev: Evaluation,
                   as_of: datetime, cause: Cause, emitted_at: datetime,
                   since: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grade changes and alerts due for one customer; updates ``grades`` (last emitted) in place,
    and ``since`` (when each ladder's grade last changed, for hysteresis) when given."""
    changes: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    as_of_local: datetime | None = None
    for ladder in rs.ladders:
        grade = ev.grades[ladder.name]
        previous = grades.get(ladder.name)
        if grade == previous:
            continue
        if as_of_local is None:
            as_of_local = as_of.astimezone(rs.tz)
            as_of_iso = _iso(as_of_local)
            emitted_iso = _emitted_iso(emitted_at)
        change = {
            "schema_version": SCHEMA_VERSION,
            "event_id": change_id(customer_id, ladder.name, rs, cause, as_of_local, previous, grade),
            "customer_id": customer_id,
            "ladder": ladder.name,
            "ruleset": {"id": rs.id, "version": rs.version},
            "previous_grade": previous,
            "grade": grade,
            "direction": _direction(ladder, previous, grade),
            "as_of": as_of_iso,
            "cause": _cause(cause),
            "metrics": metrics_of(rs, ev, ladder),
            "reasons": ev.reasons[ladder.name],
            "emitted_at": emitted_iso,
        }
        grades[ladder.name] = grade
        if since is not None:
            since[ladder.name] = as_of.timestamp()
        changes.append(change)
        alert = _alert(customer_id, ladder, change, as_of_local)
        if alert is not None:
            alerts.append(alert)
    return changes, alerts


def grade(customer_id: str, rs: CompiledRuleset, state: CustomerState, as_of: datetime, cause: Cause,
          emitted_at: datetime, population: Population | None = None,
          as_of_ts: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate ``state`` as of ``as_of`` and return the changes and alerts due; updates the state's
    last-emitted grades, their times and the ruleset that graded it. The processor calls this after
    every event; a clock sweep calls it with ``Cause("clock", None)``. ``as_of_ts``:
    ``as_of.timestamp()``, when the caller has it."""
    evaluation = evaluate(rs, state, as_of, population, as_of_ts=as_of_ts)
    state.ruleset = rs.key
    # When a grade was emitted matters only to a minimum dwell time: keep the state small otherwise.
    since = state.grade_since if rs.tracks_since else None
    return decide_changes(customer_id, rs, state.grades, evaluation, as_of, cause, emitted_at, since)


def regrade_for_rules(customer_id: str, rs: CompiledRuleset, state: CustomerState, emitted_at: datetime,
                      population: Population | None = None, promotion_id: str | None = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Re-grade a customer graded by another ruleset (or version): changes with cause ``rules``, no more.

    The cause names the version that graded the customer before (``previous_ruleset``) and, for a
    promotion or rollback, the control record's ``promotion_id`` (its ``event_id``, part of the
    change's id: promoting v2, rolling back to v1 and promoting v2 again makes new ids each time).

    Evaluated as of the customer's latest event time (so ids are deterministic
    and grades stay in event time), without hysteresis (the new rules decide
    afresh). Grades of ladders the new ruleset no longer has are forgotten
    silently; a new ladder gets an ``initial`` change. A customer already
    graded by ``rs`` gets nothing. Updates ``state``.
    """
    if state.ruleset == rs.key:
        return [], []
    previous = state.ruleset
    state.ruleset = rs.key
    known = {ladder.name for ladder in rs.ladders}
    for name in [n for n in state.grades if n not in known]:
        del state.grades[name]
        state.grade_since.pop(name, None)
    if state.last_event_ts is None:
        return [], []
    as_of = datetime.fromtimestamp(graded_at(state) or state.last_event_ts, rs.tz)
    prune(state, local_day(as_of, rs.tz), rs.retention_days)
    evaluation = evaluate(rs, state, as_of, population, hysteresis=False)
    return decide_changes(customer_id, rs, state.grades, evaluation, as_of, Cause("rules", promotion_id, previous), emitted_at,
                          state.grade_since if rs.tracks_since else None)
