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

from rules.state import MAX_INVOICES, CustomerState, remember


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
