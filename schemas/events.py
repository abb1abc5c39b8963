"""Pydantic models of every event on every gradeflow topic (the public contract).

Inputs (``transactions``, ``interactions``) are validated on the hot path by
:mod:`schemas.decode`, which gives the same verdicts as these models far
faster; these models are the contract, the JSON Schema source and the source
of readable error messages. Outputs are built as these models' dicts.

Versioning: every output carries ``schema_version``. A change that removes or
retypes a field bumps it; adding an optional field does not.

Input contract history (inputs carry no version field; additions only):
- 1.0: transaction types ``purchase`` and ``refund``.
- 1.1: transaction types ``deposit``, ``withdrawal`` (balances),
  ``invoice`` and ``payment`` (days to pay, linked by the new optional
  ``invoice_id``, required for these two); interaction types ``assessment``
  (facts recorded about a customer in ``attributes``), ``overdue``,
  ``suspicious_transaction`` and ``violation`` (risk records). Purchases
  and refunds are unchanged; a 1.0 consumer never sees the new types.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator,
)

from schemas import SCHEMA_VERSION
from schemas.errors import InvalidEvent
from schemas.money import AMOUNT_PATTERN, CURRENCY_EXPONENTS, decimal_to_minor, parse_amount
from schemas.timestamps import RFC3339_PATTERN, parse_rfc3339

CustomerId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _event_time(value: object) -> datetime:
    # JSON gives a string; Python callers may also pass an aware datetime.
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamp must carry a UTC offset (RFC 3339), e.g. 2026-01-31T09:30:00+08:00")
        return value
    try:
        return parse_rfc3339(value)
    except InvalidEvent as exc:
        raise ValueError(exc.message) from None


# The same parser as schemas.decode: an RFC 3339 string with offset, never a
# Unix time or another ISO 8601 form (pydantic's lax datetime takes those).
AwareDatetime = Annotated[
    datetime,
    BeforeValidator(_event_time),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
]


def _amount(value: object) -> Decimal:
    try:
        return parse_amount(value)
    except InvalidEvent as exc:
        raise ValueError(exc.message) from None


# The same parser as schemas.decode (schemas.money.parse_amount).
Amount = Annotated[
    Decimal,
    BeforeValidator(_amount),
    WithJsonSchema({"anyOf": [
        {"type": "string", "pattern": AMOUNT_PATTERN.replace("^-?", "^")},  # > 0: no sign
        {"type": "number", "exclusiveMinimum": 0},
    ]}),
]


def _finite_json(value: Any) -> bool:
    """False if ``value`` holds NaN or an infinity anywhere (not JSON; the fast decoder refuses them)."""
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_json(v) for v in value)
    return True


def _known_currency(value: str) -> str:
    if value not in CURRENCY_EXPONENTS:
        raise ValueError(f"currency {value!r} is not a supported ISO 4217 code")
    return value


INPUT_CONTRACT_VERSION = "1.1"
TRANSACTION_TYPES_1_0 = ("purchase", "refund")
TRANSACTION_TYPES = TRANSACTION_TYPES_1_0 + ("deposit", "withdrawal", "invoice", "payment")  # 1.1
INTERACTION_TYPES = (
    "visit", "call", "trial_class", "quote_requested", "deposit_paid", "complaint",
    "praise", "referral", "stage_update", "email", "meeting", "queue_number",
    # 1.1
    "assessment", "overdue", "suspicious_transaction", "violation",
)


class _Input(BaseModel):
    # Unknown fields are accepted and ignored: producers may enrich events
    # without breaking gradeflow (documented in schemas/README.md).
    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _strict_json(cls, data: Any) -> Any:
        # pydantic's JSON parser reads NaN / Infinity literals, even in ignored
        # fields; they are not JSON and the fast decoder refuses the event.
        if not _finite_json(data):
            raise ValueError("NaN and Infinity are not JSON numbers")
        return data


# The currencies gradeflow knows, listed in the JSON Schema (typed so that pydantic's JsonDict accepts it).
_CURRENCY_ENUM: dict[str, Any] = {"enum": sorted(CURRENCY_EXPONENTS)}


class Transaction(_Input):
    """A purchase, refund, deposit, withdrawal, invoice or payment, keyed by ``customer_id`` on ``transactions``."""

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra={"allOf": [{
        "if": {"properties": {"type": {"enum": ["invoice", "payment"]}}, "required": ["type"]},
        "then": {"required": ["invoice_id"], "properties": {"invoice_id": {"type": "string", "minLength": 1}}},
    }]})

    event_id: EventId
    customer_id: CustomerId
    occurred_at: AwareDatetime = Field(description="Event time, RFC 3339 with offset.")
    type: Literal[TRANSACTION_TYPES] = Field(  # type: ignore[valid-type]
        description="purchase | refund (1.0); deposit | withdrawal | invoice | payment (1.1).")
    amount: Amount = Field(
        description="Decimal string (preferred) or number, > 0, no more decimals than the currency has."
    )
    currency: Annotated[str, AfterValidator(_known_currency)] = Field(
        description="ISO 4217 code.", json_schema_extra=_CURRENCY_ENUM)
    order_id: str | None = None
    channel: str | None = None
    attributes: dict[str, Any] | None = None
    invoice_id: str | None = Field(None, description="1.1: the invoice an invoice or payment is about (required for those).")

    @model_validator(mode="after")
    def _invoice_linked(self) -> "Transaction":
        if self.type in ("invoice", "payment") and not self.invoice_id:
            raise ValueError(f"a {self.type} needs a non-empty 'invoice_id'")
        return self

    @model_validator(mode="after")
    def _decimals_fit_currency(self) -> "Transaction":
        try:
            decimal_to_minor(self.amount, self.currency)
        except InvalidEvent as exc:
            raise ValueError(exc.message) from None
        return self


class Interaction(_Input):
    """A contact with a customer, keyed by ``customer_id`` on the ``interactions`` topic."""

    event_id: EventId
    customer_id: CustomerId
    occurred_at: AwareDatetime
    type: Literal[INTERACTION_TYPES]  # type: ignore[valid-type]
    attributes: dict[str, Any] | None = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION  # type: ignore[assignment]


class RulesetRef(BaseModel):
    id: str
    version: str


class Cause(BaseModel):
    kind: Literal["transaction", "interaction", "clock", "rules"]
    event_id: str | None = Field(
        None, description="transaction, interaction: the input event's id; rules: the promotion's id "
                          "(rules-control promotion_id), null when the worker started on a new version; clock: null.")
    previous_ruleset: RulesetRef | None = Field(
        None, description="rules only: the ruleset (id and version) that graded the customer before (added in 1, "
                          "optional: absent in changes of earlier releases and of other causes).")


class Metrics(BaseModel):
    recency_days: int | None = Field(description="Whole days since the last purchase, in the ruleset's time zone; null before any.")
    frequency: int = Field(description="Purchases in the rolling window.")
    monetary: str = Field(description="Net amount (purchases minus refunds) in the window, decimal string in the ruleset currency.")
    r: int
    f: int
    m: int
    code: str = Field(description="R, F and M scores as one string, e.g. '545'.")
    values: dict[str, Any] | None = Field(
        None, description="The metrics this ladder's grade depends on, by catalogue name (money as decimal strings).")


class GradeChange(_Output):
    """Emitted on ``grade-changes`` when, and only when, a customer's grade on a ladder changes."""

    event_id: str = Field(description="Deterministic: a replay or retry of the same change has the same id.")
    customer_id: str
    ladder: str
    ruleset: RulesetRef
    previous_grade: str | None
    grade: str
    direction: Literal["initial", "upgrade", "downgrade"]
    as_of: datetime = Field(description="Event time at which the grade was evaluated.")
    cause: Cause
    metrics: Metrics
    reasons: list[str]
    emitted_at: datetime


class Alert(_Output):
    """Emitted on ``grade-alerts`` when a customer in a key grade is downgraded (kind ``downgrade``),
    or will be by time alone within the at-risk horizon (kind ``at_risk``, a warning before it)."""

    alert_id: str
    customer_id: str
    ladder: str
    severity: Literal["info", "warning", "critical"]
    summary: str
    previous_grade: str = Field(description="The grade before the drop (at_risk: the grade held now).")
    grade: str = Field(description="The grade after the drop (at_risk: the grade it will drop to at due_at).")
    grade_change_event_id: str = Field(
        description="The grade change of the downgrade (at_risk: the id the clock's downgrade at due_at will carry "
                    "if it happens as predicted).")
    as_of: datetime = Field(description="downgrade: when the grade changed; at_risk: when the warning became due "
                                        "(due_at minus the horizon, or later if the state was graded later).")
    dedup_key: str = Field(description="Stable per customer, ladder and kind: alert tools group on it.")
    kind: Literal["downgrade", "at_risk"] = Field(
        "downgrade", description="downgrade: a key customer was downgraded; at_risk: one will be by time alone "
                                 "at due_at unless something changes (added in 1, optional: absent means downgrade).")
    due_at: datetime | None = Field(
        None, description="at_risk only: the instant time alone will lower the grade (null or absent otherwise).")
    cause: Cause | None = Field(
        None, description="What made the grade change (at_risk: the clock), as on the grade change (added in 1, "
                          "optional: absent in alerts of earlier releases).")


class DeadLetter(_Output):
    """An input event gradeflow could not apply, with its origin and the reason."""

    reason: str = Field(description="Stable code: malformed_json, invalid_field, unknown_type, invalid_amount, ...")
    error: str = Field(description="What is wrong, in words.")
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    key: str | None
    key_encoding: Literal["utf-8", "base64"] | None
    value: str | None
    value_encoding: Literal["utf-8", "base64"] | None
    dead_lettered_at: datetime


class RulesControl(_Output):
    """The active ruleset of every worker of an app, on ``<app id>-rules-control`` (key ``active``,
    compacted): written by ``gradeflow rules promote`` and ``gradeflow rules rollback``, read to its
    end by every worker before it grades and followed while it runs (docs/rules-lifecycle.md)."""

    control_version: int = Field(ge=1, description="Increases by one with every promotion or rollback; a worker "
                                                   "ignores a record whose control_version is not above the one it runs.")
    action: Literal["promote", "rollback"]
    promotion_id: str = Field(description="Deterministic id of this record (app, control_version, ruleset): the "
                                          "cause event_id of the grade changes it makes.")
    ruleset: RulesetRef = Field(description="The ruleset every worker runs from this record on.")
    document: str = Field(description="The ruleset's YAML text: every worker compiles this, whatever its local files.")
    previous: RulesetRef | None = Field(description="The ruleset active before (what a rollback returns to).")
    previous_document: str | None = Field(description="Its YAML text, so that a rollback needs no local file.")
    requested_by: str = Field(description="Who wrote the record (user@host of the command).")
    requested_at: datetime


class RulesProgress(_Output):
    """A worker's re-grade after a promotion, on the rules-control topic (key ``progress/<worker>``):
    what ``gradeflow rules promote --wait`` follows for every worker at once."""

    worker: str = Field(description="The worker: host and HTTP port.")
    control_version: int = Field(ge=0, description="The control record being applied (0: none, the worker's own start).")
    ruleset: RulesetRef
    partitions: list[int] = Field(description="Input partitions the worker owns.")
    partitions_done: list[int] = Field(description="Those whose every customer is graded by ``ruleset``.")
    customers_total: int = Field(ge=0, description="Customers of the partitions being re-graded.")
    customers_done: int = Field(ge=0, description="Of those, examined so far (re-graded or already up to date).")
    regraded: int = Field(ge=0, description="Customers re-graded (their state was graded by another version).")
    eta_s: float | None = Field(description="Seconds left at the current rate; null when unknown or done.")
    complete: bool = Field(description="True once every owned partition is done.")
    updated_at: datetime


ALL_MODELS: dict[str, type[BaseModel]] = {
    "transaction": Transaction,
    "interaction": Interaction,
    "grade-change": GradeChange,
    "alert": Alert,
    "dead-letter": DeadLetter,
    "rules-control": RulesControl,
    "rules-progress": RulesProgress,
}
