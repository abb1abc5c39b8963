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
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson

from rules import windows
from rules.changes import Cause, grade
from rules.engine import CompiledRuleset, Population
from rules.state import CustomerState, fold, prune
from schemas import SCHEMA_VERSION
from schemas.decode import Contact, Txn, decode_interaction, decode_transaction
from schemas.errors import InvalidEvent

TRANSACTIONS = "t"
INTERACTIONS = "i"

# Kafka's default message limit is 1 MiB; a dead letter must fit in it.
DEAD_LETTER_MAX_BYTES = 256 * 1024


@dataclass(slots=True)
class Record:
    """One consumed record, with its origin."""

    role: str  # TRANSACTIONS | INTERACTIONS
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    origin: Any = None  # the framework's event, carried through for table writes


class StateReader(Protocol):
    """Where customer state is read from: a Faust table, a dict, Redis…"""

    def get(self, customer_id: str) -> bytes | None: ...


@dataclass(slots=True)
class BatchResult:
    """What one batch produced. Outputs are in order: dead letters, then changes and alerts."""

    grade_changes: list[tuple[bytes, bytes]] = field(default_factory=list)
    alerts: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    # customer_id → (serialized state, the last record of that customer in the batch)
    states: dict[str, tuple[bytes, Record]] = field(default_factory=dict)
    consumed: int = 0
    applied: int = 0
    replayed: int = 0
    dead: int = 0


def _text_or_b64(raw: bytes | None) -> tuple[str | None, str | None]:
    if raw is None:
        return None, None
    clipped = raw[:DEAD_LETTER_MAX_BYTES]
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
    return orjson.dumps(doc)


def process_batch(records: list[Record], rs: CompiledRuleset, store: StateReader, now: datetime,
                  check_keys: bool = True, population: Population | None = None) -> BatchResult:
    """Apply a batch of records; return outputs and the new state of every touched customer.

    ``now`` is wall-clock time, used only for ``emitted_at`` and
    ``dead_lettered_at``; grades are evaluated in event time. ``population``
    holds the thresholds of relative grades (rules/population.py), if any.
    """
    result = BatchResult(consumed=len(records))
    by_customer: dict[str, list[tuple[Record, Txn | Contact]]] = {}
    for record in records:
        try:
            if record.role == TRANSACTIONS:
                event: Txn | Contact = decode_transaction(record.value, record.key, check_keys)
                if event.currency != rs.currency:
                    raise InvalidEvent("invalid_currency",
                                       f"currency {event.currency} is not the ruleset's currency {rs.currency}")
            else:
                event = decode_interaction(record.value, record.key, check_keys)
        except InvalidEvent as error:
            result.dead_letters.append((record.key, dead_letter(record, error, now)))
            result.dead += 1
            continue
        by_customer.setdefault(event.customer_id, []).append((record, event))

    tz = rs.tz
    track = rs.track
    longest = rs.retention_days
    for customer_id, events in by_customer.items():
        raw = store.get(customer_id)
        state = CustomerState.from_bytes(raw) if raw is not None else CustomerState()
        key = customer_id.encode()
        last_record = None
        for record, event in events:
            # At-least-once delivery replays records after a crash; the state
            # remembers the last offset it applied from each input partition.
            if record.offset <= state.offsets.get(record.role, -1):
                result.replayed += 1
                continue
            ts = event.occurred_at.timestamp()
            fold(state, event, track, tz)
            cause = Cause("transaction" if isinstance(event, Txn) else "interaction", event.event_id)
            state.offsets[record.role] = record.offset
            assert state.last_event_ts is not None
            # Grades never go back in time: an older event is evaluated as of
            # the customer's latest event time, with the old event in its bucket.
            as_of = event.occurred_at if ts >= state.last_event_ts else datetime.fromtimestamp(state.last_event_ts, tz)
            prune(state, windows.local_day(as_of, tz), longest)
            changes, alerts = grade(customer_id, rs, state, as_of, cause, now, population)
            for change in changes:
                result.grade_changes.append((key, orjson.dumps(change)))
            for alert in alerts:
                result.alerts.append((key, orjson.dumps(alert)))
            result.applied += 1
            last_record = record
        if last_record is not None:
            result.states[customer_id] = (state.to_bytes(), last_record)
    return result


def utcnow() -> datetime:
    """Wall-clock now, aware. Only the I/O edge calls this."""
    return datetime.now(timezone.utc)
