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
    kind: Literal["transaction", "interaction", "clock", "rules", "merge"]
    event_id: str | None = Field(
        None, description="transaction, interaction: the input event's id; rules: the promotion's id "
                          "(rules-control promotion_id), null when the worker started on a new version; merge: the "
                          "merge id (docs/customers.md); clock: null.")
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
    direction: Literal["initial", "upgrade", "downgrade", "ended"] = Field(
        description="ended: the id was merged into another customer; its grade is then the terminal grade "
                    "\"none\" and it has no more changes (docs/customers.md).")
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


class CustomerErasure(_Output):
    """A request to erase a customer (``customer-erasures``; ``gradeflow customers erase`` writes it).

    Key: ``erasure_id``. Producers write it to partition 0; each worker passes it on to the next
    input partition once it erased what it holds there (docs/erasure.md)."""

    erasure_id: str = Field(min_length=1, max_length=128, description="Unique per request; the receipt carries it.")
    customer_id: CustomerId
    requested_at: datetime = Field(description="The erasure instant: events that occurred at or before it are refused.")
    partition: int = Field(0, ge=0, description="The input partition this record visits (0 when requested).")
    state_partition: int | None = Field(None, description="Where the customer's state was found, once found.")


class ErasureRemoved(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_partition: int | None = Field(description="Input partition whose state (and changelog) was tombstoned; null: none held.")
    output_tombstones: list[str] = Field(description="Compacted output topics given a tombstone keyed by the customer.")
    redis_keys: int = Field(description="Redis keys and entries removed (grades, alert marks, console entries).")


class ErasureReceipt(_Output):
    """An erasure done (``erasure-receipts``): what was removed, so that downstream services erase too. Key: ``customer_id``."""

    erasure_id: str
    customer_id: str
    requested_at: datetime
    completed_at: datetime
    removed: ErasureRemoved
    retained: list[str] = Field(description="What remains by design, in words (the refusal marker, topics that expire).")


class ShadowDifference(BaseModel):
    """One ladder where a shadow ruleset's grade differs from the active one's."""

    ladder: str
    from_: str | None = Field(alias="from", description="The active ruleset's grade (null: none on this ladder).")
    to: str = Field(description="The shadow ruleset's grade.")
    direction: Literal["initial", "upgrade", "downgrade"] = Field(
        description="How a promotion of the shadow ruleset would move the customer.")
    alert: Literal["warning", "critical"] | None = Field(
        description="The alert that move would raise (a key customer downgraded), or null.")
    values: dict[str, Any] = Field(description="The shadow ruleset's metrics of this ladder (money as decimal strings).")
    reasons: list[str] = Field(description="Why the shadow ruleset gives this grade.")


class ShadowGrades(BaseModel):
    ruleset: RulesetRef
    grades: dict[str, str] = Field(description="The shadow ruleset's grade per ladder.")
    as_of: datetime | None = Field(description="Event time the shadow ruleset last graded the customer as of: the "
                                               "active one's, or later when time alone moved a shadow grade since.")
    differences: list[ShadowDifference]


class ShadowDiff(_Output):
    """``grade-shadow-diffs`` (compacted, key = customer_id): a customer's grades under the active
    ruleset and each shadow ruleset, published when either changes; never a grade change."""

    customer_id: str
    ruleset: RulesetRef = Field(description="The active ruleset.")
    grades: dict[str, str] = Field(description="The active ruleset's grade per ladder.")
    as_of: datetime | None = Field(description="Event time the active ruleset last graded the customer as of "
                                               "(the shadows were graded as of it too).")
    differs: bool = Field(description="Whether any shadow grade differs from the active one.")
    shadows: list[ShadowGrades]
    emitted_at: datetime


class CustomerMerge(_Output):
    """A record of ``customer-merges`` (``gradeflow customers merge FROM INTO`` writes the request).

    Key: ``merge_id``. One topic carries every step of a merge (docs/customers.md): the request
    visiting the input partitions to find both ids (``find``), the hand-off at FROM's partition
    (``hand_off``), FROM's state sent to INTO's partition (``transfer``), FROM's later events sent
    there (``event``) and the outcome (``done`` or ``refused``, on partition 0)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    merge_id: str = Field(min_length=1, max_length=128, description="Unique per request; every step carries it.")
    from_id: CustomerId = Field(alias="from", description="The id that ends: merged into `into`.")
    into_id: CustomerId = Field(alias="into", description="The id that stays, with the facts of both.")
    requested_at: datetime
    step: Literal["find", "hand_off", "transfer", "event", "done", "refused"] = "find"
    partition: int = Field(0, ge=0, description="find: the input partition this record visits (0 when requested).")
    into_partition: int | None = Field(None, description="Where INTO's state was found, once found.")
    from_partition: int | None = Field(None, description="Where FROM's state was found, once found.")
    state: str | None = Field(None, description="transfer: FROM's state (the changelog format, as text).")
    role: Literal["t", "i"] | None = Field(None, description="event: the input topic it came from (t: transactions, "
                                                             "i: interactions).")
    event: dict[str, Any] | None = Field(None, description="event: FROM's event, its customer_id now INTO.")
    reason: str | None = Field(None, description="refused: why nothing was merged.")


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
    "customer-erasure": CustomerErasure,
    "erasure-receipt": ErasureReceipt,
    "shadow-diff": ShadowDiff,
    "customer-merge": CustomerMerge,
    "rules-control": RulesControl,
    "rules-progress": RulesProgress,
}
