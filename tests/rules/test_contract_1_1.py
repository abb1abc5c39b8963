"""Input contract 1.1: new transaction and interaction types, the same verdict from decoder, model and JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from schemas.decode import decode_interaction, decode_transaction
from schemas.errors import InvalidEvent
from schemas.events import INTERACTION_TYPES, TRANSACTION_TYPES, Interaction, Transaction
from streams.tools.local import ROOT

SCHEMA = json.loads((ROOT / "schemas" / "json" / "transaction.schema.json").read_text(encoding="utf-8"))
BASE = {"event_id": "e", "customer_id": "c", "occurred_at": "2026-01-02T03:04:05+08:00", "amount": "12.50",
        "currency": "CNY"}


@pytest.mark.parametrize(("doc", "verdict"), [
    ({**BASE, "type": "deposit"}, None),
    ({**BASE, "type": "withdrawal"}, None),
    ({**BASE, "type": "invoice", "invoice_id": "INV-1"}, None),
    ({**BASE, "type": "payment", "invoice_id": "INV-1"}, None),
    ({**BASE, "type": "purchase", "invoice_id": "INV-1"}, None),
    ({**BASE, "type": "invoice"}, "invalid_field"),
    ({**BASE, "type": "payment", "invoice_id": ""}, "invalid_field"),
    ({**BASE, "type": "payment", "invoice_id": 7}, "invalid_field"),
    ({**BASE, "type": "transfer"}, "unknown_type"),
])
def test_transaction_types_of_1_1(doc, verdict) -> None:
    raw = orjson.dumps(doc)
    schema_ok = jsonschema.Draft202012Validator(SCHEMA).is_valid(doc)
    try:
        Transaction.model_validate_json(raw)
        model_ok = True
    except ValidationError:
        model_ok = False
    try:
        txn = decode_transaction(raw, check_key=False)
        got = None
    except InvalidEvent as exc:
        got = exc.reason
    assert got == verdict
    assert model_ok == schema_ok == (verdict is None)
    if verdict is None:
        assert txn.kind == doc["type"] and txn.amount_minor == 1250 and txn.invoice_id == doc.get("invoice_id")
        assert txn.refund is False


def test_every_type_is_listed_and_1_0_is_unchanged() -> None:
    assert TRANSACTION_TYPES[:2] == ("purchase", "refund")
    for kind in ("assessment", "overdue", "suspicious_transaction", "violation"):
        assert kind in INTERACTION_TYPES
        doc = {"event_id": "e", "customer_id": "c", "occurred_at": "2026-01-02T03:04:05Z", "type": kind,
               "attributes": {"identity_verified": True}}
        assert decode_interaction(orjson.dumps(doc), check_key=False).type == kind
        Interaction.model_validate(doc)
    refund = decode_transaction(orjson.dumps({**BASE, "type": "refund"}), check_key=False)
    assert refund.refund and refund.kind == "refund"
