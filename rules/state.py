"""Per-customer rolling state, compact in memory and on the changelog.

One :class:`CustomerState` per customer holds everything the rules need:
recency, daily purchase buckets of the longest window, interaction history
(last time overall and by type, counts by type, and, when the ruleset counts
interactions in a window, daily counts), the latest value of each attribute the
ruleset declares, daily balance flows (deposits minus withdrawals), open
invoices and days-to-pay buckets, the grade last emitted on each ladder and
since when, the ruleset that graded it, and the offset of the last applied
record of each input topic (so that a replay after a crash does not apply a
record twice) and the ids of the events it applied, by day (so that the same
event delivered twice, at another offset, counts once). It serializes to a
short JSON array; parts a ruleset does not use stay empty and cost nothing.

Format: ``[3, …9 positional fields…, ext]``. New parts are added as optional
keys of ``ext`` (readers take a missing key as empty), so adding one keeps the
format number and old bytes on the changelogs stay readable; the number changes
only for a change an older reader would misread. Every earlier format is read:

- 3: the daily buckets of two numbers as one flat list
  ``[day, purchases, net, day, …]`` (wider ones, with detail, in ext ``bw`` as
  ``[[day, …], …]``), and the applied event ids as ext ``sd``, an object
  ``{event_id: day}`` (a list of days for an id seen on several). Format 2 made
  a list per bucket and two per day of ids: fewer bytes, and half the objects
  to build and free for every state a batch reads and writes.
- 2: ``ext`` added; buckets ``[[day, purchases, net, …], …]``, ids ext
  ``se`` as ``[[day, [id, …]], …]``.
- 1: no ``ext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from rules import windows

_FORMAT = 3
# ext key → (CustomerState field, stored as [[key, value], …] pairs rather than an object);
# "rs", "sd", "bw" and format 2's "se" are read by from_bytes itself.
_EXT = {"gs": ("grade_since", False), "lt": ("last_by_type", False),
        "ib": ("ibuckets", True), "at": ("attrs", False), "fl": ("flows", True), "bb": ("balance_base", False),
        "iv": ("invoices", False), "wr": ("warned", False), "sh": ("shadow", False),
        "mt": ("merged_into", False), "mg": ("merges", False)}
# Invoices kept per customer (paid ones leave with the retention window);
# beyond this, a new invoice replaces the earliest paid one, or is not tracked.
MAX_INVOICES = 500


@dataclass(slots=True, frozen=True)
class Tracking:
    """What a ruleset needs kept beyond the basics (compiled from the rule file)."""

    detail: bool = False  # gross and largest purchase per day
    interaction_days: bool = False  # interaction counts by type per day
    attributes: tuple[tuple[str, str], ...] = ()  # (name, kind) of declared attributes
    retention_days: int = 365


@dataclass(slots=True, init=False)
class CustomerState:
    """Everything gradeflow remembers about one customer."""

    last_event_ts: float | None = None
    last_purchase_ts: float | None = None
    first_purchase_ts: float | None = None
    # day → [purchases, net_minor] or, with detail, [purchases, net, gross, largest]
    buckets: windows.Buckets = field(default_factory=dict)
    last_interaction_ts: float | None = None
    interaction_counts: dict[str, int] = field(default_factory=dict)
    grades: dict[str, str] = field(default_factory=dict)
    # Offset of the last applied record per input topic role ("t", "i").
    offsets: dict[str, int] = field(default_factory=dict)
    last_by_type: dict[str, float] = field(default_factory=dict)
    ibuckets: dict[int, dict[str, int]] = field(default_factory=dict)
    attrs: dict[str, list[Any]] = field(default_factory=dict)  # name → [ts, value]
    flows: dict[int, int] = field(default_factory=dict)  # day → deposits − withdrawals
    balance_base: int = 0  # balance before the oldest day in flows
    # invoice id → [local day issued or None, local day paid or None]; the earliest of each wins,
    # so a re-sent invoice or payment, in any order, changes nothing.
    invoices: dict[str, list[int | None]] = field(default_factory=dict)
    grade_since: dict[str, float] = field(default_factory=dict)  # ladder → ts of the last change
    ruleset: str | None = None  # "id@version" that last graded this customer
    # Applied event id → the UTC day (Unix days) of its occurred_at, or a list of days for an id
    # applied on several (an event is its id and its day). Pruned by the processor past the
    # allowed lateness: an older event is refused as late, so its id need not be remembered.
    # Kept as ext "sd".
    seen: dict[str, int | list[int]] = field(default_factory=dict)
    # ladder → the instant (seconds) of the clock downgrade an at-risk warning was emitted for
    # (rules/risk.py): one warning per drop instant. Kept as ext "wr".
    warned: dict[str, float] = field(default_factory=dict)
    # Shadow rulesets (rules/shadow.py): "id@version" → {"g": grades, "s": since, "at": the instant the
    # active ruleset had graded the customer as of when the shadow last followed}. Kept as ext "sh".
    shadow: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Identity merges (rules/merge.py). On an id merged into another, the state is only this
    # marker, ``[into_id, merge_id, into_partition]``: no facts, no grades. Kept as ext "mt".
    merged_into: list[Any] | None = None
    # On the surviving id: merge id → the id merged into it (a merge is applied once). Ext "mg".
    merges: dict[str, str] = field(default_factory=dict)

    # Written out: a dataclass's generated __init__ is interpreted even in a compiled module
    # (schemas/compiled.py), and a state is built for every customer a batch touches.
    def __init__(self, last_event_ts: float | None = None, last_purchase_ts: float | None = None,
                 first_purchase_ts: float | None = None, buckets: windows.Buckets | None = None,
                 last_interaction_ts: float | None = None, interaction_counts: dict[str, int] | None = None,
                 grades: dict[str, str] | None = None, offsets: dict[str, int] | None = None, *,
                 last_by_type: dict[str, float] | None = None, ibuckets: dict[int, dict[str, int]] | None = None,
                 attrs: dict[str, list[Any]] | None = None, flows: dict[int, int] | None = None,
                 balance_base: int = 0, invoices: dict[str, list[int | None]] | None = None,
                 grade_since: dict[str, float] | None = None, ruleset: str | None = None,
                 seen: dict[str, int | list[int]] | None = None, warned: dict[str, float] | None = None,
                 shadow: dict[str, dict[str, Any]] | None = None,
                 merged_into: list[Any] | None = None, merges: dict[str, str] | None = None) -> None:
        self.last_event_ts = last_event_ts
        self.last_purchase_ts = last_purchase_ts
        self.first_purchase_ts = first_purchase_ts
        self.buckets = {} if buckets is None else buckets
        self.last_interaction_ts = last_interaction_ts
        self.interaction_counts = {} if interaction_counts is None else interaction_counts
        self.grades = {} if grades is None else grades
        self.offsets = {} if offsets is None else offsets
        self.last_by_type = {} if last_by_type is None else last_by_type
        self.ibuckets = {} if ibuckets is None else ibuckets
        self.attrs = {} if attrs is None else attrs
        self.flows = {} if flows is None else flows
        self.balance_base = balance_base
        self.invoices = {} if invoices is None else invoices
        self.grade_since = {} if grade_since is None else grade_since
        self.ruleset = ruleset
        self.seen = {} if seen is None else seen
        self.warned = {} if warned is None else warned
        self.shadow = {} if shadow is None else shadow
        self.merged_into = merged_into
        self.merges = {} if merges is None else merges

    def to_bytes(self) -> bytes:
        """Serialize to the changelog format (a JSON array, versioned), in an allocation of its size."""
        ext: dict[str, Any] = {}
        if self.last_by_type:
            ext["lt"] = self.last_by_type
        if self.ibuckets:
            ext["ib"] = [[d, c] for d, c in self.ibuckets.items()]
        if self.attrs:
            ext["at"] = self.attrs
        if self.flows:
            ext["fl"] = [[d, v] for d, v in self.flows.items()]
        if self.balance_base:
            ext["bb"] = self.balance_base
        if self.invoices:
            ext["iv"] = self.invoices
        if self.grade_since:
            ext["gs"] = self.grade_since
        if self.seen:
            ext["sd"] = self.seen
        if self.warned:
            ext["wr"] = self.warned
        if self.shadow:
            ext["sh"] = self.shadow
        if self.merged_into is not None:
            ext["mt"] = self.merged_into
        if self.merges:
            ext["mg"] = self.merges
        flat: list[int] = []
        wide: list[list[int]] = []
        for day, b in self.buckets.items():
            if len(b) == 2:
                flat.append(day)
                flat.append(b[0])
                flat.append(b[1])
            else:
                wide.append([day, *b])
        if wide:
            ext["bw"] = wide
        if self.ruleset is not None:
            ext["rs"] = self.ruleset  # last, always: see graded_by
        # orjson's output holds a 4 KiB allocation whatever its length, and a state lives on in the
        # table: the right-sized copy is what is kept (docs/performance.md,
        # "Memory: right-sized bytes and malloc settings").
        return bytes(memoryview(orjson.dumps([
            _FORMAT,
            self.last_event_ts,
            self.last_purchase_ts,
            self.first_purchase_ts,
            flat,
            self.last_interaction_ts,
            self.interaction_counts,
            self.grades,
            self.offsets,
            ext,
        ])))

    @staticmethod
    def graded_by(raw: bytes, ruleset: str) -> bool:
        """Whether the state ``raw`` (from :meth:`to_bytes`) was last graded by ``ruleset``, without decoding it.

        Exact: ``"rs"`` is the last key of the last element, so the state ends with
        ``"rs":"<ruleset>"}]``. Inside a JSON string a quote is escaped, and an object nested
        in the state (customer attributes) closes with one more brace, so nothing else can
        end that way. A state written before ``"rs"`` moved last reads False: the caller
        decodes it, as it would have anyway.
        """
        tail = b'"rs":' + orjson.dumps(ruleset) + b"}]"
        return raw.endswith(tail) and raw[-len(tail) - 1:-len(tail)] in (b",", b"{")

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CustomerState":
        """Inverse of :meth:`to_bytes`; also reads formats 1 and 2."""
        doc = orjson.loads(raw)
        version = doc[0]
        if version == _FORMAT:
            flat = doc[4]
            buckets: windows.Buckets = {}
            for i in range(0, len(flat), 3):
                buckets[flat[i]] = [flat[i + 1], flat[i + 2]]
        elif version == 1 or version == 2:
            # Each bucket [day, purchases, net, …] becomes day → [purchases, net, …] in place.
            buckets = {b.pop(0): b for b in doc[4]}
        else:
            raise ValueError(f"unknown customer state format {version!r}")
        state = cls(doc[1], doc[2], doc[3], buckets, doc[5], doc[6], doc[7], doc[8])
        ext = doc[9] if len(doc) > 9 else None
        if ext:  # most rulesets use few of these: look only at the keys present
            for name, value in ext.items():
                if name == "rs":  # every graded state has these two: no lookup, no setattr
                    state.ruleset = value
                elif name == "sd":
                    state.seen = value
                elif name == "bw":
                    for b in value:
                        buckets[b.pop(0)] = b
                elif name == "se":  # format 2: [[day, [id, …]], …]
                    for day, ids in value:
                        for event_id in ids:
                            remember(state, day, event_id)
                else:
                    part = _EXT.get(name)
                    if part is not None:  # a key a newer format added is left alone
                        setattr(state, part[0], dict(value) if part[1] else value)
        return state


# Where the clock records the instant it last graded a customer (seconds), so that a schedule
# rebuilt from the table resumes from there. A key of grade_since no ladder can have.
GRADED_AT = "@clock"


def graded_at(state: CustomerState) -> float | None:
    """The latest instant (seconds) the state was graded as of: its latest event or the clock."""
    latest = state.last_event_ts
    clock = state.grade_since.get(GRADED_AT) if state.grade_since else None
    if clock is None:
        return latest
    return clock if latest is None or clock > latest else latest


def seen_before(state: CustomerState, day: int, event_id: str) -> bool:
    """Whether an event with ``event_id`` on UTC ``day`` was already applied to ``state``."""
    days = state.seen.get(event_id)
    if days is None:
        return False
    if isinstance(days, int):
        return days == day
    return day in days


def remember(state: CustomerState, day: int, event_id: str) -> None:
    """Record that the event ``event_id`` of UTC ``day`` was applied."""
    seen = state.seen
    days = seen.get(event_id)
    if days is None:
        seen[event_id] = day
    elif isinstance(days, int):
        if days != day:
            seen[event_id] = [days, day]
    elif day not in days:
        days.append(day)


def forget_seen_before(state: CustomerState, first_day: int) -> None:
    """Drop the ids of events of days before ``first_day`` (they can only come back as late)."""
    seen = state.seen
    if not seen:
        return
    gone: list[str] = []
    for event_id, days in seen.items():
        if isinstance(days, int):
            if days < first_day:
                gone.append(event_id)
        elif min(days) < first_day:  # rare: the same id on several days
            kept = [d for d in days if d >= first_day]
            if not kept:
                gone.append(event_id)
            else:
                seen[event_id] = kept[0] if len(kept) == 1 else kept  # a value, not a key: safe mid-loop
    for event_id in gone:
        del seen[event_id]


def _later(current: float | None, ts: float) -> float:
    return ts if current is None or ts > current else current


def apply_transaction(state: CustomerState, ts: float, day: int, refund: bool, amount_minor: int,
                      detail: bool = False) -> None:
    """Fold one purchase or refund into ``state``.

    A refund lowers the net amount of the day it happened on and changes
    neither recency nor frequency: the customer did not buy. With ``detail``
    the day's bucket also keeps gross purchases and the largest purchase.
    """
    state.last_event_ts = _later(state.last_event_ts, ts)
    if detail:
        bucket = state.buckets.get(day)
        if bucket is None:
            bucket = state.buckets[day] = [0, 0, 0, 0]
        elif len(bucket) == 2:
            bucket.extend((max(bucket[1], 0) if bucket[0] else 0, 0))
        if refund:
            bucket[1] -= amount_minor
            return
        bucket[0] += 1
        bucket[1] += amount_minor
        bucket[2] += amount_minor
        if amount_minor > bucket[3]:
            bucket[3] = amount_minor
    elif refund:
        windows.add(state.buckets, day, 0, -amount_minor)
        return
    else:
        windows.add(state.buckets, day, 1, amount_minor)
    state.last_purchase_ts = _later(state.last_purchase_ts, ts)
    if state.first_purchase_ts is None or ts < state.first_purchase_ts:
        state.first_purchase_ts = ts


def apply_balance(state: CustomerState, ts: float, day: int, withdrawal: bool, amount_minor: int) -> None:
    """Fold one deposit or withdrawal into the day's net flow."""
    state.last_event_ts = _later(state.last_event_ts, ts)
    flow = -amount_minor if withdrawal else amount_minor
    state.flows[day] = state.flows.get(day, 0) + flow


def apply_invoice(state: CustomerState, ts: float, day: int, invoice_id: str | None, payment: bool) -> None:
    """Fold an invoice (the day it was issued) or a payment (the day it was paid) of ``invoice_id``."""
    state.last_event_ts = _later(state.last_event_ts, ts)
    if invoice_id is None:
        return
    entry = state.invoices.get(invoice_id)
    if entry is None:
        if len(state.invoices) >= MAX_INVOICES:
            paid = [(e[1], k) for k, e in state.invoices.items() if e[1] is not None]
            if not paid:
                return
            del state.invoices[min(paid)[1]]
        entry = state.invoices[invoice_id] = [None, None]
    slot = 1 if payment else 0
    if entry[slot] is None or day < entry[slot]:  # type: ignore[operator]
        entry[slot] = day


def apply_interaction(state: CustomerState, ts: float, kind: str, day: int | None = None,
                      attributes: dict[str, Any] | None = None, track: Tracking | None = None,
                      tz: ZoneInfo | None = None) -> None:
    """Fold one interaction into ``state``: last time overall and by type, counts by type,
    and, as ``track`` asks, the day's count by type and the declared attributes it carries."""
    state.last_event_ts = _later(state.last_event_ts, ts)
    state.last_interaction_ts = _later(state.last_interaction_ts, ts)
    state.interaction_counts[kind] = state.interaction_counts.get(kind, 0) + 1
    state.last_by_type[kind] = _later(state.last_by_type.get(kind), ts)
    if track is None:
        return
    if track.interaction_days and day is not None:
        counts = state.ibuckets.get(day)
        if counts is None:
            state.ibuckets[day] = {kind: 1}
        else:
            counts[kind] = counts.get(kind, 0) + 1
    if attributes and track.attributes:
        for name, attr_kind in track.attributes:
            if name in attributes:
                held = state.attrs.get(name)
                # The latest by event time wins, whatever the order of arrival.
                if held is None or ts >= held[0]:
                    state.attrs[name] = [ts, coerce(attributes[name], attr_kind, tz)]


def coerce(value: Any, kind: str, tz: ZoneInfo | None) -> Any:
    """An attribute value as its declared kind, or None when it cannot be read as one."""
    if value is None:
        return None
    if kind == "number":
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip().rstrip("%")) / (100 if value.strip().endswith("%") else 1)
            except ValueError:
                return None
            return number if number == number and abs(number) != float("inf") else None
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
            return value.lower() in ("true", "yes")
        return None
    if kind == "date":
        if not isinstance(value, str):
            return None
        try:
            if len(value) == 10:
                return date.fromisoformat(value).toordinal()
            moment = datetime.fromisoformat(value.upper())
        except ValueError:
            return None
        if moment.tzinfo is None or tz is None:
            return moment.date().toordinal()
        return moment.astimezone(tz).toordinal()
    # text
    if isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def prune(state: CustomerState, as_of_day: int, retention_days: int) -> None:
    """Drop every daily bucket that can no longer fall in any window of the ruleset.

    Balance flows older than the retention are folded into the base balance,
    so the balance stays exact.
    """
    windows.prune(state.buckets, as_of_day, retention_days)
    first = as_of_day - retention_days + 1
    if state.ibuckets:
        for day in [d for d in state.ibuckets if d < first]:
            del state.ibuckets[day]
    if state.flows:
        for day in [d for d in state.flows if d < first]:
            state.balance_base += state.flows.pop(day)
    if state.invoices:
        for key in [k for k, (_, paid) in state.invoices.items() if paid is not None and paid < first]:
            del state.invoices[key]


def fold(state: CustomerState, event: Any, track: Tracking, tz: ZoneInfo) -> None:
    """Fold one decoded event (``schemas.decode.Txn`` or ``Contact``) into ``state`` as ``track`` asks."""
    ts = event.ts
    if hasattr(event, "amount_minor"):
        day = windows.day_of_ts(ts, tz)
        kind = event.kind
        if kind == "purchase" or kind == "refund":
            apply_transaction(state, ts, day, event.refund, event.amount_minor, track.detail)
        elif kind == "deposit" or kind == "withdrawal":
            apply_balance(state, ts, day, kind == "withdrawal", event.amount_minor)
        else:
            apply_invoice(state, ts, day, event.invoice_id, kind == "payment")
        return
    iday = windows.day_of_ts(ts, tz) if track.interaction_days else None
    apply_interaction(state, ts, event.type, iday, event.attributes, track, tz)
