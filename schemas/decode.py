"""Fast validation of input events, on the hot path.

Building a pydantic model per event costs more than grading it, so valid
events are checked here by hand into plain slotted dataclasses; the verdicts
are the same as :mod:`schemas.events` (a test runs both over the same corpus).
Every rejection is an :class:`~schemas.errors.InvalidEvent` with a stable
reason code and a sentence naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from schemas.errors import InvalidEvent
from schemas.events import INTERACTION_TYPES, TRANSACTION_TYPES
from schemas.money import CURRENCY_EXPONENTS, to_minor
from schemas.timestamps import epoch_seconds, parse_rfc3339

_INTERACTION_TYPES = frozenset(INTERACTION_TYPES)
_TRANSACTION_TYPES = frozenset(TRANSACTION_TYPES)
_MAX_ID = 256
_REQUIRED_TXN_FIELDS = 6  # event_id, customer_id, occurred_at, type, currency, amount


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, which
# cost more than the rest of building one; these are built once per event and never changed.
@dataclass(slots=True, init=False)
class Txn:
    """A validated transaction; ``amount_minor`` is always positive; ``ts`` is ``occurred_at`` in Unix seconds."""

    event_id: str
    customer_id: str
    occurred_at: datetime
    ts: float
    refund: bool
    amount_minor: int
    currency: str
    kind: str  # one of schemas.events.TRANSACTION_TYPES
    invoice_id: str | None

    # Written out: a dataclass's generated __init__ is interpreted even in a compiled module
    # (schemas/compiled.py), and this one runs once per event.
    def __init__(self, event_id: str, customer_id: str, occurred_at: datetime, ts: float, refund: bool,
                 amount_minor: int, currency: str, kind: str = "purchase", invoice_id: str | None = None) -> None:
        self.event_id = event_id
        self.customer_id = customer_id
        self.occurred_at = occurred_at
        self.ts = ts
        self.refund = refund
        self.amount_minor = amount_minor
        self.currency = currency
        self.kind = kind
        self.invoice_id = invoice_id


@dataclass(slots=True, init=False)
class Contact:
    """A validated interaction; ``ts`` is ``occurred_at`` in Unix seconds."""

    event_id: str
    customer_id: str
    occurred_at: datetime
    ts: float
    type: str
    attributes: dict[str, Any] | None

    # Written out: a dataclass's generated __init__ is interpreted even in a compiled module
    # (schemas/compiled.py), and this one runs once per interaction.
    def __init__(self, event_id: str, customer_id: str, occurred_at: datetime, ts: float, type: str,
                 attributes: dict[str, Any] | None) -> None:
        self.event_id = event_id
        self.customer_id = customer_id
        self.occurred_at = occurred_at
        self.ts = ts
        self.type = type
        self.attributes = attributes


def _load(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise InvalidEvent("tombstone", "value is null (tombstone); events must be JSON objects")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("malformed_json", f"value is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidEvent("invalid_field", f"value must be a JSON object, got {type(doc).__name__}")
    return doc


def _id(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        raise InvalidEvent("invalid_field", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise InvalidEvent("invalid_field", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidEvent("invalid_field", f"field {name!r} must not be empty")
    if len(value) > _MAX_ID:
        raise InvalidEvent("invalid_field", f"field {name!r} is longer than {_MAX_ID} characters")
    if value[0] == "\x00":  # the state table's own keys start so (streams/clock.py)
        raise InvalidEvent("invalid_field", f"field {name!r} must not start with a NUL character")
    return value


def _time(doc: dict[str, Any]) -> tuple[datetime, float]:
    """``occurred_at`` and its Unix seconds."""
    value = doc.get("occurred_at")
    if value is None:
        raise InvalidEvent("invalid_field", "field 'occurred_at' is missing")
    moment = parse_rfc3339(value)
    return moment, epoch_seconds(value, moment)


def _optional(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidEvent("invalid_field", f"field {name!r} must be {kind.__name__} or absent")
    return value


def _key_matches(key: bytes | None, customer_id: str) -> None:
    # State lives in the partition of the key; an event whose key is not its
    # customer would update the wrong partition's state.
    if key is None or key != customer_id.encode():
        shown = "null" if key is None else repr(key[:64])
        if key is not None:
            try:
                key.decode("utf-8")
            except UnicodeDecodeError:
                shown += " (not UTF-8)"
        raise InvalidEvent("key_mismatch", f"message key {shown} is not the event's customer_id {customer_id[:64]!r}")


def decode_transaction(raw: bytes | None, key: bytes | None = None, check_key: bool = True) -> Txn:
    """Validate one ``transactions`` record into a :class:`Txn` or raise ``InvalidEvent``."""
    doc = _load(raw)
    event_id = _id(doc, "event_id")
    customer_id = _id(doc, "customer_id")
    occurred_at, ts = _time(doc)
    kind = doc.get("type")
    if kind != "purchase" and kind != "refund" and (not isinstance(kind, str) or kind not in _TRANSACTION_TYPES):
        raise InvalidEvent("unknown_type", f"transaction type {str(kind)[:40]!r} is not one of "
                                           f"{', '.join(TRANSACTION_TYPES)}")
    currency = doc.get("currency")
    if not isinstance(currency, str):
        raise InvalidEvent("invalid_currency", "field 'currency' must be an ISO 4217 code string")
    if currency not in CURRENCY_EXPONENTS:
        raise InvalidEvent("invalid_currency", f"currency {currency[:16]!r} is not a supported ISO 4217 code")
    if "amount" not in doc:
        raise InvalidEvent("invalid_field", "field 'amount' is missing")
    amount_minor = to_minor(doc["amount"], currency)
    invoice_id = None
    # The six fields above are all there, so a document of six has none of the optional ones.
    if len(doc) > _REQUIRED_TXN_FIELDS:
        _optional(doc, "order_id", str)
        _optional(doc, "channel", str)
        _optional(doc, "attributes", dict)
        invoice_id = _optional(doc, "invoice_id", str)
    if (kind == "invoice" or kind == "payment") and not invoice_id:
        raise InvalidEvent("invalid_field", f"a {kind} needs a non-empty 'invoice_id'")
    if check_key:
        _key_matches(key, customer_id)
    return Txn(event_id, customer_id, occurred_at, ts, kind == "refund", amount_minor, currency, kind, invoice_id)


def decode_interaction(raw: bytes | None, key: bytes | None = None, check_key: bool = True) -> Contact:
    """Validate one ``interactions`` record into a :class:`Contact` or raise ``InvalidEvent``."""
    doc = _load(raw)
    event_id = _id(doc, "event_id")
    customer_id = _id(doc, "customer_id")
    occurred_at, ts = _time(doc)
    kind = doc.get("type")
    if not isinstance(kind, str) or kind not in _INTERACTION_TYPES:
        raise InvalidEvent("unknown_type", f"interaction type {str(kind)[:40]!r} is not one of {sorted(_INTERACTION_TYPES)}")
    attributes = _optional(doc, "attributes", dict)
    if check_key:
        _key_matches(key, customer_id)
    return Contact(event_id, customer_id, occurred_at, ts, kind, attributes)
