"""The hot path, free of Kafka: a batch of raw records in, outputs and new state out.

The agent hands a batch of records here; this module decodes them, groups the
valid ones by customer, folds each customer's events into their state in
order, evaluates the ruleset after every event (so that batching never hides
a grade change) and returns what to send and what to store. The same function
runs in the worker, in ``gradeflow rules try`` and in tests.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import orjson

from rules import risk, shadow, windows
from rules.changes import Cause, grade, regrade_for_rules
from rules.schedule import catch_up
from rules.deciders import Population
from rules.engine import CompiledRuleset
from rules.erasure import Erasures
from rules.state import CustomerState, fold, forget_seen_before, graded_at, prune, remember, seen_before
from schemas import SCHEMA_VERSION
from schemas.decode import Contact, Txn, decode_interaction, decode_transaction
from schemas.errors import InvalidEvent

TRANSACTIONS = "t"
INTERACTIONS = "i"
# Events of an id merged into another, applied to that other (streams/merging.py): their offsets
# are those of the merge topic, kept apart from the inputs' in the state.
MERGED_TRANSACTIONS = "mt"
MERGED_INTERACTIONS = "mi"

# Kafka's default message limit is 1 MiB; a dead letter must fit in it.
DEAD_LETTER_MAX_BYTES = 256 * 1024
# A dead letter longer than this (text with many characters JSON must escape) carries key and
# value as base64 instead, which bounds it to 4/3 of the clipped bytes.
_DEAD_LETTER_SOFT_LIMIT = 900_000
# An input value longer than this is not an event (real ones are well under 4 KiB): it is a
# dead letter ("too_large") without being parsed. The broker's default limit (1 MiB) refuses
# larger ones before they reach gradeflow.
MAX_EVENT_BYTES = 256 * 1024
# Defaults of GRADEFLOW_MAX_FUTURE_SKEW_S; GRADEFLOW_ALLOWED_LATENESS_DAYS defaults to the
# ruleset's retention (its longest window).
MAX_FUTURE_SKEW_S = 86400.0
_DAY_S = 86400.0


@dataclass(slots=True, init=False)
class Record:
    """One consumed record, with its origin."""

    role: str  # TRANSACTIONS | INTERACTIONS (MERGED_… for events of a merged-away id)
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    origin: Any  # the framework's event, carried through for table writes

    # Written out: a dataclass's generated __init__ is interpreted even in a compiled module
    # (schemas/compiled.py), and this one runs once per event.
    def __init__(self, role: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                 timestamp_ms: int | None = None, origin: Any = None) -> None:
        self.role = role
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.timestamp_ms = timestamp_ms
        self.origin = origin


class StateReader(Protocol):
    """Where customer state is read from: a Faust table, a dict, Redis…

    A reader may also have ``get_many(customer_ids) -> list[bytes | None]``, the states of a
    batch's customers in one call (:func:`read_states` uses it when there)."""

    def get(self, customer_id: str) -> bytes | None: ...


def read_states(store: StateReader, customer_ids: list[str]) -> list[bytes | None]:
    """The state bytes of each of ``customer_ids`` (None for a customer never seen), in order:
    with the store's ``get_many`` where it has one (the memory store's index reads a batch of
    states in one call, streams/faustext/state_index.py), else one ``get`` each."""
    many = getattr(store, "get_many", None)
    if many is not None:
        return many(customer_ids)
    get = store.get
    return [get(customer_id) for customer_id in customer_ids]


@dataclass(slots=True)
class BatchResult:
    """What one batch produced. Outputs are in order: dead letters, then changes and alerts."""

    grade_changes: list[tuple[bytes, bytes]] = field(default_factory=list)
    alerts: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    # customer_id → (serialized state, the last record of that customer in the batch)
    states: dict[str, tuple[bytes, Record]] = field(default_factory=dict)
    # With a clock (``clock_horizon`` given): customer_id → (latest event time, first instant the
    # clock must look at them, rules.risk.first_look), computed while the state is decoded anyway.
    looks: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    # With the event clock (``stream_time`` given): input partition → the highest event time of
    # its records, through this batch.
    stream_time: dict[int, float] = field(default_factory=dict)
    # consumed == applied + duplicates + replayed + dead + refused, always.
    consumed: int = 0
    applied: int = 0
    replayed: int = 0  # offset already applied (a replay after a crash or rebalance): skipped, no output
    duplicates: int = 0  # event_id already applied (producer retry, re-sent event): skipped, no output
    dead: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)  # reason → dead letters of this batch
    # An erased customer's event that occurred at or before the erasure: skipped, no output, and
    # no dead letter either (it would copy the personal data the erasure removed).
    refused: int = 0
    # With shadow rulesets: the grade-shadow-diffs records (key, value) of the customers whose
    # differences from the active grades changed, and each written customer's differences now
    # (rules.shadow.signature: a customer differs when any of its entries is a non-empty tuple).
    shadow_diffs: list[tuple[bytes, bytes]] = field(default_factory=list)
    shadow_signatures: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Events of an id merged into another (its state is the merge marker): each with the marker's
    # [into_id, merge_id, into_partition], to send there (streams/merging.py); nothing else here.
    forwarded: list[tuple[Record, list[Any]]] = field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        return self.consumed == (self.applied + self.duplicates + self.replayed + self.dead + self.refused
                                 + len(self.forwarded))


def _text_or_b64(raw: bytes | None, force_b64: bool = False) -> tuple[str | None, str | None]:
    if raw is None:
        return None, None
    clipped = raw[:DEAD_LETTER_MAX_BYTES]
    if force_b64:
        return base64.b64encode(clipped).decode("ascii"), "base64"
    try:
        return clipped.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(clipped).decode("ascii"), "base64"


def dead_letter(record: Record, error: InvalidEvent, now: datetime) -> bytes:
    """The dead-letter value for ``record`` (see :class:`schemas.events.DeadLetter`)."""
    key, key_encoding = _text_or_b64(record.key)
    value, value_encoding = _text_or_b64(record.value)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "reason": error.reason,
        "error": error.message,
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "source_timestamp_ms": record.timestamp_ms,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "dead_lettered_at": now.isoformat(),
    }
    if record.value is not None and len(record.value) > DEAD_LETTER_MAX_BYTES:
        doc["error"] += f" (value truncated to {DEAD_LETTER_MAX_BYTES} of {len(record.value)} bytes)"
    if record.key is not None and len(record.key) > DEAD_LETTER_MAX_BYTES:
        doc["error"] += f" (key truncated to {DEAD_LETTER_MAX_BYTES} of {len(record.key)} bytes)"
    out = orjson.dumps(doc)
    if len(out) > _DEAD_LETTER_SOFT_LIMIT:
        doc["key"], doc["key_encoding"] = _text_or_b64(record.key, True)
        doc["value"], doc["value_encoding"] = _text_or_b64(record.value, True)
        out = orjson.dumps(doc)
    return out


def process_batch(records: list[Record], rs: CompiledRuleset, store: StateReader, now: datetime,
                  check_keys: bool = True, population: Population | None = None,
                  allowed_lateness_days: float | None = None,
                  max_future_skew_s: float | None = MAX_FUTURE_SKEW_S,
                  clock_horizon: timedelta | None = None,
                  stream_time: dict[int, float] | None = None,
                  erased: Erasures | None = None,
                  shadows: tuple[CompiledRuleset, ...] = (),
                  promotion_id: str | None = None) -> BatchResult:
    """Apply a batch of records; return outputs and the new state of every touched customer.

    ``now`` is wall-clock time, used for ``emitted_at``, ``dead_lettered_at``
    and the future-timestamp check; grades are evaluated in event time.
    ``population`` holds the thresholds of relative grades (rules/population.py),
    if any.

    Each record ends as exactly one of: applied; replayed (its offset was
    already applied to the customer: a redelivery after a crash); duplicate
    (its ``event_id`` was already applied, on the same UTC day of its
    ``occurred_at``); dead letter. Dead letters beyond decoding: ``future_timestamp``
    (``occurred_at`` more than ``max_future_skew_s`` after ``now``; None: no
    check) and ``late`` (``occurred_at`` more than ``allowed_lateness_days``,
    default the ruleset's retention, before the customer's latest event time:
    the stream time is kept per customer, in its state, so the verdict does
    not depend on partitioning, batching or which worker runs).

    ``clock_horizon``: the worker runs a clock (streams/clock.py) with this at-risk horizon
    (``timedelta(0)``: none); each written customer then also gets the clock's first look
    (``BatchResult.looks``). None: no clock, nothing computed.

    With a clock, before a customer's event is applied the customer is re-graded by time alone
    (:func:`rules.schedule.catch_up`) up to the time the event's partition has reached: with the
    event clock (``stream_time``: partition → highest event time before this batch), the highest
    event time of the partition's records up to and including this one; with the wall clock
    (``stream_time`` None), the event's own time, never past ``now``. The clock's changes are
    therefore placed by the records' order, not by when a timer fired: a replay of the same
    records emits the same changes with the same ids, in the same order. The partitions' stream
    times after the batch are in ``BatchResult.stream_time``.

    ``erased``: the erasures the worker knows (rules/erasure.py). An event of an erased customer
    that occurred at or before the erasure instant is *refused*: counted, nothing else.
    ``shadows``: candidate rulesets (rules/shadow.py) graded beside ``rs`` as of the same instants,
    kept in the customers' states; their grades leave only as ``BatchResult.shadow_diffs``. Empty:
    nothing of theirs runs.
    A customer whose state another ruleset version graded is first re-graded by ``rs`` (cause
    ``rules``, :func:`rules.changes.regrade_for_rules`, with ``promotion_id`` when a promotion made
    ``rs`` the active one), before their event: a promotion's changes carry cause ``rules``
    whether the worker's re-grade sweep or an event reaches the customer first.
    """
    result = BatchResult(consumed=len(records))
    dead_letters = result.dead_letters
    reasons = result.dead_reasons
    future_limit = now.timestamp() + max_future_skew_s if max_future_skew_s is not None else float("inf")
    by_customer: dict[str, list[tuple[Record, Txn | Contact, float, float]]] = {}
    clocked = clock_horizon is not None
    streams: dict[int, float] = result.stream_time
    if stream_time is not None:
        streams.update(stream_time)
    now_ts = now.timestamp()
    for record in records:
        try:
            value = record.value
            if value is not None and len(value) > MAX_EVENT_BYTES:
                raise InvalidEvent("too_large", f"value of {len(value)} bytes is larger than an event may be "
                                                f"({MAX_EVENT_BYTES} bytes)")
            role = record.role
            if role == TRANSACTIONS or role == MERGED_TRANSACTIONS:
                txn = decode_transaction(value, record.key, check_keys)
                if txn.currency != rs.currency:
                    raise InvalidEvent("invalid_currency",
                                       f"currency {txn.currency} is not the ruleset's currency {rs.currency}")
                event: Txn | Contact = txn
            else:
                event = decode_interaction(value, record.key, check_keys)
            ts = event.ts
            if ts > future_limit:
                raise InvalidEvent("future_timestamp",
                                   f"occurred_at {event.occurred_at.isoformat()} is more than {max_future_skew_s:g} s "
                                   f"after the wall clock ({now.isoformat()})")
        except InvalidEvent as error:
            dead_letters.append((record.key, dead_letter(record, error, now)))
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
            continue
        if stream_time is not None:
            reached = streams.get(record.partition)
            if reached is None or ts > reached:
                streams[record.partition] = reached = ts
        else:
            reached = ts if ts < now_ts else now_ts
        by_customer.setdefault(event.customer_id, []).append((record, event, ts, reached))

    tz = rs.tz
    track = rs.track
    longest = rs.retention_days
    lateness_days = longest if allowed_lateness_days is None else allowed_lateness_days
    lateness_s = lateness_days * _DAY_S
    for (customer_id, events), raw in zip(by_customer.items(), read_states(store, list(by_customer))):
        state = CustomerState.from_bytes(raw) if raw is not None else CustomerState()
        key = customer_id.encode()
        last_record = None
        before = shadow.signature(shadows, state) if shadows else None
        offsets = state.offsets
        erased_at = erased.erased_at(customer_id) if erased else None
        if state.merged_into is not None:
            forwarded = [(record, state.merged_into) for record, _e, ts, _r in events
                         if erased_at is None or ts > erased_at]
            result.refused += len(events) - len(forwarded)
            result.forwarded += forwarded
            continue
        for record, event, ts, reached in events:
            if erased_at is not None and ts <= erased_at:
                result.refused += 1
                continue
            role = record.role
            # At-least-once delivery replays records after a crash; the state
            # remembers the last offset it applied from each input partition.
            if record.offset <= offsets.get(role, -1):
                result.replayed += 1
                continue
            offsets[role] = record.offset
            last_record = record  # from here on the state changes (at least its offsets)
            if state.ruleset is not None and state.ruleset != rs.key:
                changes, alerts = regrade_for_rules(customer_id, rs, state, now, population, promotion_id)
                if changes:
                    _emit(result, key, changes, alerts)
                if shadows:  # as the rules sweep does (streams/rules_start.py plan)
                    shadow.forget_others(shadows, state)
                    shadow.follow_rules(shadows, customer_id, state, now)
            latest = state.last_event_ts
            # Late before duplicate: ids are forgotten past the lateness, so this order gives
            # the same verdict however records are batched.
            if latest is not None and ts < latest - lateness_s:
                late = InvalidEvent("late", f"occurred_at {event.occurred_at.isoformat()} is more than "
                                             f"{lateness_days:g} days before the customer's latest event "
                                             f"({datetime.fromtimestamp(latest, tz).isoformat()})")
                dead_letters.append((record.key, dead_letter(record, late, now)))
                reasons["late"] = reasons.get("late", 0) + 1
                continue
            day = int(ts // _DAY_S)
            event_id = event.event_id
            if seen_before(state, day, event_id):
                result.duplicates += 1
                continue
            remember(state, day, event_id)
            if clocked:
                # Time alone first: whatever it changed up to where this event's partition is.
                changes, alerts = catch_up(customer_id, rs, state, reached, now, population)
                if changes:
                    _emit(result, key, changes, alerts)
                if shadows:
                    shadow.catch_up(shadows, customer_id, state, reached, now)
            fold(state, event, track, tz)
            cause = Cause("transaction" if role == TRANSACTIONS or role == MERGED_TRANSACTIONS else "interaction",
                          event_id)
            # Grades never go back in time: an older event is evaluated as of
            # the customer's latest event time, with the old event in its bucket.
            # Nor behind the clock: a clock change already graded the customer
            # as of a later instant, which an older event must not undo.
            graded = graded_at(state)
            if graded is None or ts >= graded:
                as_of, as_of_ts = event.occurred_at, ts
            else:
                as_of, as_of_ts = datetime.fromtimestamp(graded, tz), graded
            prune(state, windows.day_of_ts(as_of_ts, tz), longest)
            changes, alerts = grade(customer_id, rs, state, as_of, cause, now, population, as_of_ts)
            if changes:
                _emit(result, key, changes, alerts)
            if shadows:
                shadow.follow_event(shadows, customer_id, state, as_of, as_of_ts, cause, now)
            result.applied += 1
        if last_record is not None:
            if state.seen and state.last_event_ts is not None:
                forget_seen_before(state, int((state.last_event_ts - lateness_s) // _DAY_S))
            if shadows:
                shadow_out(result, rs, shadows, customer_id, key, state, before, now)
            elif state.shadow:
                state.shadow.clear()  # the shadows of an earlier run: they no longer follow
            result.states[customer_id] = (state.to_bytes(), last_record)
            if clock_horizon is not None:
                look = risk.first_look(rs, state, clock_horizon, population)
                if shadows:
                    look = risk.earliest(look, shadow.first_look(shadows, state))
                result.looks[customer_id] = (state.last_event_ts, look)
    result.dead = len(dead_letters)
    return result


def shadow_out(result: BatchResult, rs: CompiledRuleset, shadows: tuple[CompiledRuleset, ...], customer_id: str,
               key: bytes, state: CustomerState, before: tuple[Any, ...] | None, now: datetime) -> None:
    """A customer's shadow record after a batch: one on grade-shadow-diffs when what differs changed
    (a customer that stops differing gets one saying so, for compacted readers)."""
    shadow.forget_others(shadows, state)
    after = shadow.signature(shadows, state)
    result.shadow_signatures[customer_id] = after
    if after != before:
        result.shadow_diffs.append((key, orjson.dumps(shadow.diff_record(rs, shadows, customer_id, state, now))))


def _emit(result: BatchResult, key: bytes, changes: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> None:
    """Queue a customer's change and alert documents, serialized. Right-sized: a batch holds its
    documents until the outbox is acked, and each orjson output holds 4 KiB whatever its length
    (docs/performance.md, "Memory")."""
    for change in changes:
        result.grade_changes.append((key, bytes(memoryview(orjson.dumps(change)))))
    for alert in alerts:
        result.alerts.append((key, bytes(memoryview(orjson.dumps(alert)))))


def utcnow() -> datetime:
    """Wall-clock now, aware. Only the I/O edge calls this."""
    return datetime.now(timezone.utc)
