"""Two customer ids found to be one customer: the facts of both states, combined exactly.

Every fact a state holds is a sum, a maximum, a minimum, a union or "the latest by event time"
of the events folded into it, so folding a customer's events into two states and combining them
gives the state that folding all the events into one would have given, in any order: daily
purchase buckets and flows add up, counts add up, last times take the later one, the first
purchase the earlier one, an invoice's issue and payment days the earlier one, an attribute the
value with the later time, the applied event ids their union.

What is not a fact of the events stays the surviving customer's own: the grades last emitted,
since when, the ruleset that graded them, the at-risk warnings sent, and the offsets of the last
records applied (the other id's records were on another partition, so its offsets mean nothing
here). The merged customer is then re-graded from the combined facts.

One fact a state forgets is not recovered: a paid invoice leaves the state once its payment is
older than the ruleset's retention, so an invoice one id received and the other id paid longer
ago than that stays open on the merged customer. Within the retention, both halves meet.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rules.changes import Cause, change_id, grade, metrics_of
from rules.deciders import Population
from rules.engine import CompiledRuleset, evaluate
from rules.state import MAX_INVOICES, CustomerState, forget_seen_before, graded_at, prune, remember
from rules.windows import day_of_ts
from schemas import SCHEMA_VERSION

# The grade an id merged into another ends with on every ladder: not a grade of any ladder (a
# ruleset may not name one so, rules/ruleset.py), and the id has no change after it.
TERMINAL_GRADE = "none"
# The direction of that last change.
ENDED = "ended"


def _widen(bucket: list[int]) -> list[int]:
    """A [purchases, net] bucket as [purchases, net, gross, largest], as a detailed ruleset would
    have begun it on that day (rules.state.apply_transaction does the same)."""
    if len(bucket) == 2:
        return [bucket[0], bucket[1], max(bucket[1], 0) if bucket[0] else 0, 0]
    return list(bucket)


def _later(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None or a >= b else b


def _earlier(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None or a <= b else b


def merge_facts(into: CustomerState, other: CustomerState) -> None:
    """Add the facts of ``other`` to ``into`` (in place), as if ``into`` had seen its events too."""
    into.last_event_ts = _later(into.last_event_ts, other.last_event_ts)
    into.last_purchase_ts = _later(into.last_purchase_ts, other.last_purchase_ts)
    into.first_purchase_ts = _earlier(into.first_purchase_ts, other.first_purchase_ts)
    into.last_interaction_ts = _later(into.last_interaction_ts, other.last_interaction_ts)

    for day, theirs in other.buckets.items():
        mine = into.buckets.get(day)
        if mine is None:
            into.buckets[day] = list(theirs)
        elif len(mine) == 2 and len(theirs) == 2:
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        else:
            a, b = _widen(mine), _widen(theirs)
            into.buckets[day] = [a[0] + b[0], a[1] + b[1], a[2] + b[2], max(a[3], b[3])]

    for kind, n in other.interaction_counts.items():
        into.interaction_counts[kind] = into.interaction_counts.get(kind, 0) + n
    for kind, ts in other.last_by_type.items():
        into.last_by_type[kind] = _later(into.last_by_type.get(kind), ts)  # type: ignore[assignment]
    for day, counts in other.ibuckets.items():
        mine_counts = into.ibuckets.setdefault(day, {})
        for kind, n in counts.items():
            mine_counts[kind] = mine_counts.get(kind, 0) + n
    for name, (ts, value) in other.attrs.items():
        held = into.attrs.get(name)
        # The latest by event time wins; at the same instant, the later arrival does in a fold,
        # and the merged id's events arrive after: its value wins.
        if held is None or ts >= held[0]:
            into.attrs[name] = [ts, value]

    for day, flow in other.flows.items():
        into.flows[day] = into.flows.get(day, 0) + flow
    into.balance_base += other.balance_base

    for invoice_id, (issued, paid) in other.invoices.items():
        entry = into.invoices.get(invoice_id)
        if entry is None:
            into.invoices[invoice_id] = [issued, paid]
            continue
        if issued is not None and (entry[0] is None or issued < entry[0]):
            entry[0] = issued
        if paid is not None and (entry[1] is None or paid < entry[1]):
            entry[1] = paid
    if len(into.invoices) > MAX_INVOICES:
        # As a fold would have: past the cap, the earliest paid invoices make room.
        paid_ones = sorted((e[1], k) for k, e in into.invoices.items() if e[1] is not None)
        for _day, key in paid_ones[:len(into.invoices) - MAX_INVOICES]:
            del into.invoices[key]

    for event_id, days in other.seen.items():
        for day in ([days] if isinstance(days, int) else days):
            remember(into, day, event_id)


def marker(into_id: str, merge_id: str, into_partition: int) -> CustomerState:
    """What stays of an id merged into ``into_id``: no facts, no grades, where its events now go."""
    return CustomerState(merged_into=[into_id, merge_id, into_partition])


def moving(state: CustomerState) -> bool:
    """Whether ``state`` is an id frozen on its way into another (marked, its facts still there)
    rather than the bare marker left once the hand-off is done."""
    return state.merged_into is not None and (state.last_event_ts is not None or bool(state.grades))


def terminal_changes(customer_id: str, rs: CompiledRuleset, state: CustomerState, into_id: str, merge_id: str,
                     at: float, emitted_at: datetime,
                     population: Population | None = None) -> list[dict[str, Any]]:
    """The last change of each graded ladder of ``customer_id``, merged into ``into_id``: to
    :data:`TERMINAL_GRADE`, direction :data:`ENDED`, cause ``merge``, as of the later of the
    state's last grading and ``at`` (the merge request's instant), so ``as_of`` never goes back.
    The metrics are the id's last ones. No alert: the customer is not lost, it lives on as ``into_id``."""
    graded = graded_at(state)
    as_of_ts = at if graded is None or at > graded else graded
    as_of = datetime.fromtimestamp(as_of_ts, rs.tz)
    ev = evaluate(rs, state, datetime.fromtimestamp(graded if graded is not None else at, rs.tz), population,
                  hysteresis=False)
    cause = Cause("merge", merge_id)
    out = []
    for ladder in rs.ladders:
        previous = state.grades.get(ladder.name)
        if previous is None or previous == TERMINAL_GRADE:
            continue
        out.append({
            "schema_version": SCHEMA_VERSION,
            "event_id": change_id(customer_id, ladder.name, rs, cause, as_of, previous, TERMINAL_GRADE),
            "customer_id": customer_id,
            "ladder": ladder.name,
            "ruleset": {"id": rs.id, "version": rs.version},
            "previous_grade": previous,
            "grade": TERMINAL_GRADE,
            "direction": ENDED,
            "as_of": as_of.isoformat(),
            "cause": {"kind": cause.kind, "event_id": cause.event_id},
            "metrics": metrics_of(rs, ev, ladder),
            "reasons": [f"Merged into customer {into_id} (merge {merge_id})."],
            "emitted_at": emitted_at.isoformat(),
        })
    return out


def absorb(into_id: str, rs: CompiledRuleset, into: CustomerState, other: CustomerState, from_id: str,
           merge_id: str, emitted_at: datetime, population: Population | None = None,
           lateness_days: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Merge ``other`` (the state of ``from_id``) into ``into`` once per ``merge_id`` and re-grade it
    with cause ``merge`` as of its latest grading; the changes and alerts due, or None when this
    merge was already applied (a replayed transfer changes nothing)."""
    if merge_id in into.merges:
        return None
    merge_facts(into, other)
    into.merges[merge_id] = from_id
    for earlier_id, earlier_from in other.merges.items():  # ids merged into FROM before go with it
        into.merges.setdefault(earlier_id, earlier_from)
    as_of_ts = graded_at(into)
    if as_of_ts is None:
        return [], []
    lateness = rs.retention_days if lateness_days is None else lateness_days
    prune(into, day_of_ts(as_of_ts, rs.tz), rs.retention_days)
    if into.seen and into.last_event_ts is not None:
        forget_seen_before(into, int((into.last_event_ts - lateness * 86400.0) // 86400.0))
    return grade(into_id, rs, into, datetime.fromtimestamp(as_of_ts, rs.tz), Cause("merge", merge_id), emitted_at,
                 population, as_of_ts)
