"""The metric catalogue: names a rule file may use, their kinds and how each is computed.

A metric is named by a dotted string, checked when the file is loaded (an
unknown name is refused with the known ones listed) and compiled into a small
function ``(state, as_of_day, as_of_ts, cache) -> value``. Money is in integer
minor units, days are whole local calendar days in the ruleset's time zone, and
``None`` means "not known" (no purchase yet, attribute never set): every
comparison with an unknown value is false. See rules/README.md for the table.

Windows (``<W>`` below): ``<N>d`` (rolling N local days ending on the
evaluation day, e.g. ``30d``, ``365d``), ``month`` / ``year`` (the calendar
month / year to date), ``last_month`` / ``last_year`` (the last complete
calendar month / year), and ``window`` (the ruleset's ``window_days``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from rules import windows as _w
from rules.state import CustomerState

KINDS = ("days", "count", "money", "number", "text", "bool", "date")
ATTRIBUTE_KINDS = ("number", "text", "bool", "date")
WINDOW_NAMES = ("<N>d", "month", "year", "last_month", "last_year", "window")
PURCHASE_AGGS = {
    "count": ("count", "purchases"),
    "sum": ("money", "gross purchases"),
    "net": ("money", "net spend (purchases minus refunds)"),
    "refunds": ("money", "refunds"),
    "avg": ("money", "average purchase"),
    "max": ("money", "largest purchase"),
    "days": ("count", "distinct days with a purchase"),
}
CATALOGUE = (
    "recency_days", "tenure_days", "frequency", "monetary",
    "purchases.<count|sum|net|refunds|avg|max|days>.<W>",
    "interactions.recency_days[.<type>]", "interactions.count.<type|any>.<W>", "interactions.total.<type|any>",
    "attribute.<name>", "days_until.<date attribute>", "days_since.<date attribute>",
    "balance.current", "balance.adb.<W>",
    "invoices.open", "invoices.oldest_open_days", "invoices.paid.<W>",
    "invoices.days_to_pay_avg.<W>", "invoices.days_to_pay_max.<W>",
)
_ROLLING = re.compile(r"^([1-9][0-9]{0,3})d$")
MAX_DAYS = 3660

Getter = Callable[[CustomerState, int, float, dict], Any]


class MetricError(ValueError):
    """An unknown or malformed metric or window name, with what is known."""


@dataclass(slots=True, frozen=True)
class Window:
    name: str
    kind: str  # rolling | month | year | last_month | last_year
    days: int  # rolling length, or the retention the window needs

    def bounds(self, day: int) -> tuple[int, int]:
        """First and last local day (ordinals) of the window as of ``day``."""
        if self.kind == "rolling":
            return day - self.days + 1, day
        d = date.fromordinal(day)
        if self.kind == "month":
            return d.replace(day=1).toordinal(), day
        if self.kind == "year":
            return date(d.year, 1, 1).toordinal(), day
        if self.kind == "last_month":
            end = d.replace(day=1).toordinal() - 1
            return date.fromordinal(end).replace(day=1).toordinal(), end
        return date(d.year - 1, 1, 1).toordinal(), date(d.year - 1, 12, 31).toordinal()

    def words(self) -> str:
        if self.kind == "rolling":
            return f"in the last {self.days} days"
        return {"month": "this calendar month", "year": "this calendar year",
                "last_month": "last calendar month", "last_year": "last calendar year"}[self.kind]


def parse_window(name: str, window_days: int) -> Window:
    if name == "window":
        return Window(name, "rolling", window_days)
    m = _ROLLING.match(name)
    if m:
        days = int(m.group(1))
        if days > MAX_DAYS:
            raise MetricError(f"window {name!r} is longer than {MAX_DAYS} days")
        return Window(name, "rolling", days)
    fixed = {"month": 31, "year": 366, "last_month": 62, "last_year": 731}
    if name in fixed:
        return Window(name, name, fixed[name])
    raise MetricError(f"unknown window {name!r}; known: {', '.join(WINDOW_NAMES)} (e.g. 30d, 90d, 365d)")


@dataclass(slots=True, frozen=True)
class MetricDef:
    """A parsed metric name."""

    name: str
    kind: str
    family: str  # legacy | purchases | interactions | attribute | balance | invoices
    words: str  # what it is, for reasons
    window: Window | None = None
    arg: str | None = None  # aggregate, interaction type or attribute name
    op: str | None = None

    @property
    def retention(self) -> int:
        return self.window.days if self.window is not None else 0

    @property
    def needs_detail(self) -> bool:
        return self.family == "purchases" and self.op in ("sum", "refunds", "avg", "max")

    @property
    def needs_interaction_days(self) -> bool:
        return self.family == "interactions" and self.op == "count"


def _unknown(name: str, extra: str = "") -> MetricError:
    return MetricError(f"unknown metric {name!r}{extra}; known: {', '.join(CATALOGUE)}")


def parse_metric(name: str, window_days: int, attributes: dict[str, str], interaction_types: tuple[str, ...]) -> MetricDef:
    """Parse a metric name against the catalogue, the ruleset's attributes and the known interaction types."""
    if not isinstance(name, str):
        raise _unknown(str(name))
    parts = name.split(".")
    head = parts[0]
    default = parse_window("window", window_days)
    if len(parts) == 1:
        if name == "recency_days":
            return MetricDef(name, "days", "legacy", "last purchase")
        if name == "tenure_days":
            return MetricDef(name, "days", "legacy", "first purchase")
        if name == "frequency":
            return MetricDef(name, "count", "legacy", "purchases", default)
        if name == "monetary":
            return MetricDef(name, "money", "legacy", "net spend", default)
        raise _unknown(name)

    def typ(value: str) -> str:
        if value != "any" and value not in interaction_types:
            raise MetricError(f"unknown interaction type {value!r} in metric {name!r}; known: any, "
                              + ", ".join(interaction_types))
        return value

    def attr(value: str, want_date: bool = False) -> str:
        if value not in attributes:
            known = ", ".join(sorted(attributes)) or "none declared (add them under 'attributes:')"
            raise MetricError(f"unknown attribute {value!r} in metric {name!r}; declared attributes: {known}")
        if want_date and attributes[value] != "date":
            raise MetricError(f"metric {name!r} needs a date attribute; {value!r} is {attributes[value]}")
        return value

    if head == "purchases" and len(parts) == 3:
        if parts[1] not in PURCHASE_AGGS:
            raise _unknown(name, f" (aggregate {parts[1]!r} is not one of {', '.join(PURCHASE_AGGS)})")
        kind, words = PURCHASE_AGGS[parts[1]]
        return MetricDef(name, kind, "purchases", words, parse_window(parts[2], window_days), op=parts[1])
    if head == "interactions":
        if parts[1] == "recency_days" and len(parts) in (2, 3):
            t = typ(parts[2]) if len(parts) == 3 else "any"
            return MetricDef(name, "days", "interactions", "last interaction" if t == "any" else f"last {t}",
                             arg=t, op="recency")
        if parts[1] == "count" and len(parts) == 4:
            t = typ(parts[2])
            return MetricDef(name, "count", "interactions", "interactions" if t == "any" else f"{t} interactions",
                             parse_window(parts[3], window_days), arg=t, op="count")
        if parts[1] == "total" and len(parts) == 3:
            t = typ(parts[2])
            return MetricDef(name, "count", "interactions", "interactions ever" if t == "any" else f"{t} interactions ever",
                             arg=t, op="total")
        raise _unknown(name)
    if head == "attribute" and len(parts) == 2:
        a = attr(parts[1])
        return MetricDef(name, attributes[a], "attribute", a, arg=a, op="value")
    if head in ("days_until", "days_since") and len(parts) == 2:
        a = attr(parts[1], want_date=True)
        return MetricDef(name, "days", "attribute", a, arg=a, op=head)
    if head == "balance":
        if parts[1:] == ["current"]:
            return MetricDef(name, "money", "balance", "balance", op="current")
        if parts[1] == "adb" and len(parts) == 3:
            return MetricDef(name, "money", "balance", "average daily balance", parse_window(parts[2], window_days),
                             op="adb")
        raise _unknown(name)
    if head == "invoices":
        if parts[1:] == ["open"]:
            return MetricDef(name, "count", "invoices", "unpaid invoices", op="open")
        if parts[1:] == ["oldest_open_days"]:
            return MetricDef(name, "days", "invoices", "oldest unpaid invoice", op="oldest_open")
        if len(parts) == 3 and parts[1] in ("paid", "days_to_pay_avg", "days_to_pay_max"):
            words = {"paid": "invoices paid", "days_to_pay_avg": "average days from invoice to payment",
                     "days_to_pay_max": "longest days from invoice to payment"}[parts[1]]
            kind = "count" if parts[1] == "paid" else "days"
            return MetricDef(name, kind, "invoices", words, parse_window(parts[2], window_days), op=parts[1])
        raise _unknown(name)
    raise _unknown(name)


# ---------------------------------------------------------------- computing


def _purchase_window(state: CustomerState, first: int, last: int) -> tuple[int, int, int, int, int]:
    """count, net, gross, max, distinct days over the buckets in [first, last]."""
    count = net = gross = largest = days = 0
    for day, b in state.buckets.items():
        if first <= day <= last:
            count += b[0]
            net += b[1]
            if b[0]:
                days += 1
            if len(b) > 2:
                gross += b[2]
                if b[3] > largest:
                    largest = b[3]
            elif b[0]:
                # A bucket written before detail was tracked: its net is the best estimate.
                gross += max(b[1], 0)
    return count, net, gross, largest, days


def _purchase_basic(state: CustomerState, first: int, last: int) -> tuple[int, int]:
    """count, net over the buckets in [first, last] (the common case: no detail needed)."""
    count = net = 0
    for day, b in state.buckets.items():
        if first <= day <= last:
            count += b[0]
            net += b[1]
    return count, net


def _basic_getter(win: Any, index: int) -> Getter:
    """Purchase count (index 0) or net (1) in ``win``; one bucket scan per window and evaluation, shared via ``c``."""

    if win.kind == "rolling":
        # One evaluation has one day, so a rolling window's bounds are known by its length:
        # a constant cache key, and no tuple built per call.
        span = win.days - 1
        key = ("pb", win.days)

        def rolling(s: CustomerState, day: int, ts: float, c: dict) -> Any:
            agg = c.get(key)
            if agg is None:
                agg = c[key] = _purchase_basic(s, day - span, day)
            return agg[index]
        return rolling

    def basic(s: CustomerState, day: int, ts: float, c: dict) -> Any:
        bounds = ("pb", *win.bounds(day))
        agg = c.get(bounds)
        if agg is None:
            agg = c[bounds] = _purchase_basic(s, bounds[1], bounds[2])
        return agg[index]
    return basic


def _days_between(ts: float | None, day: int, tz: Any) -> int | None:
    if ts is None:
        return None
    return max(0, day - _w.day_of_ts(ts, tz))


def getter(m: MetricDef, tz: Any) -> Getter:
    """A function computing ``m`` from a state as of a local day and timestamp."""
    name, op, arg, win = m.name, m.op, m.arg, m.window
    key = arg if arg is not None else ""  # a type, an attribute: typed for the closures below
    if m.family == "legacy":
        if name == "tenure_days":
            return lambda s, day, ts, c: _days_between(s.first_purchase_ts, day, tz)
        if name == "recency_days":
            return lambda s, day, ts, c: _days_between(s.last_purchase_ts, day, tz)
        assert win is not None
        return _basic_getter(win, 0 if name == "frequency" else 1)
    if m.family == "purchases":
        assert win is not None

        if op in ("count", "net"):
            return _basic_getter(win, 0 if op == "count" else 1)

        def purchases(s: CustomerState, day: int, ts: float, c: dict) -> Any:
            bounds = ("p", *win.bounds(day))
            agg = c.get(bounds)
            if agg is None:
                agg = c[bounds] = _purchase_window(s, bounds[1], bounds[2])
            count, net, gross, largest, days = agg
            if op == "count":
                return count
            if op == "net":
                return net
            if op == "sum":
                return gross
            if op == "refunds":
                return gross - net
            if op == "max":
                return largest if count else None
            if op == "days":
                return days
            return gross // count if count else None  # avg, rounded down to a minor unit
        return purchases
    if m.family == "interactions":
        if op == "recency":
            if arg == "any":
                return lambda s, day, ts, c: _days_between(s.last_interaction_ts, day, tz)
            return lambda s, day, ts, c: _days_between(s.last_by_type.get(key), day, tz)
        if op == "total":
            if arg == "any":
                return lambda s, day, ts, c: sum(s.interaction_counts.values())
            return lambda s, day, ts, c: s.interaction_counts.get(key, 0)
        assert win is not None

        def icount(s: CustomerState, day: int, ts: float, c: dict) -> int:
            bounds = ("i", *win.bounds(day))
            totals = c.get(bounds)
            if totals is None:
                first, last = bounds[1], bounds[2]
                totals = c[bounds] = {}
                for d, counts in s.ibuckets.items():
                    if first <= d <= last:
                        for kind, n in counts.items():
                            totals[kind] = totals.get(kind, 0) + n
            return sum(totals.values()) if arg == "any" else totals.get(arg, 0)
        return icount
    if m.family == "attribute":
        if op == "value":
            def value(s: CustomerState, day: int, ts: float, c: dict) -> Any:
                held = s.attrs.get(key)
                return None if held is None else held[1]
            return value

        def dated(s: CustomerState, day: int, ts: float, c: dict) -> int | None:
            held = s.attrs.get(key)
            if held is None or held[1] is None:
                return None
            return held[1] - day if op == "days_until" else day - held[1]
        return dated
    if m.family == "balance":
        if op == "current":
            return lambda s, day, ts, c: s.balance_base + sum(v for d, v in s.flows.items() if d <= day)
        assert win is not None

        def adb(s: CustomerState, day: int, ts: float, c: dict) -> int:
            first, last = win.bounds(day)
            return _w.average_daily_balance(s.balance_base, s.flows, first, last)
        return adb
    # invoices: id → [day issued or None, day paid or None]
    if op == "open":
        return lambda s, day, ts, c: sum(1 for issued, paid in s.invoices.values() if issued is not None and paid is None)
    if op == "oldest_open":
        def oldest(s: CustomerState, day: int, ts: float, c: dict) -> int | None:
            issued = [i for i, p in s.invoices.values() if i is not None and p is None]
            return max(0, day - min(issued)) if issued else None
        return oldest
    assert win is not None

    def paid(s: CustomerState, day: int, ts: float, c: dict) -> int | None:
        first, last = win.bounds(day)
        n = total = longest = 0
        for issued, paid_day in s.invoices.values():
            if issued is not None and paid_day is not None and first <= paid_day <= last:
                took = max(0, paid_day - issued)
                n += 1
                total += took
                if took > longest:
                    longest = took
        if op == "paid":
            return n
        if not n:
            return None
        return longest if op == "days_to_pay_max" else total // n
    return paid


# ---------------------------------------------------------------- words


def show(kind: str, value: Any, currency: str) -> str:
    """A value as a person reads it."""
    from schemas.money import format_minor

    if value is None:
        return "unknown"
    if kind == "money":
        return f"{format_minor(int(value), currency)} {currency}"
    if kind == "days":
        return f"{value} day{'s' if value != 1 else ''}"
    if kind == "bool":
        return "yes" if value else "no"
    if kind == "number" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def phrase(m: MetricDef, value: Any, currency: str) -> str:
    """``<what> <value>``, e.g. "net spend (purchases minus refunds) in the last 365 days: 1200.00 CNY"."""
    if m.family == "legacy" and m.name in ("recency_days", "tenure_days"):
        if value is None:
            return "no purchase yet"
        return f"{m.words} {show('days', value, currency)} ago"
    if m.family == "interactions" and m.op == "recency":
        return f"no {m.words[5:] or 'interaction'} yet" if value is None else f"{m.words} {show('days', value, currency)} ago"
    if m.family == "attribute":
        if m.op == "days_until":
            return f"{m.words} unknown" if value is None else f"{show('days', value, currency)} until {m.words}"
        if m.op == "days_since":
            return f"{m.words} unknown" if value is None else f"{show('days', value, currency)} since {m.words}"
        return f"{m.words} = {show(m.kind, value, currency)}" if value is not None else f"{m.words} not set"
    where = f" {m.window.words()}" if m.window is not None else ""
    return f"{m.words}{where}: {show(m.kind, value, currency)}"
