"""The fast decoder (schemas/decode.py): reason codes, and the same verdicts as the pydantic contract."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from schemas.decode import decode_interaction, decode_transaction
from schemas.errors import InvalidEvent
from schemas.events import INTERACTION_TYPES, Interaction, Transaction

TXN: dict[str, Any] = {
    "event_id": "t-1", "customer_id": "c-1", "occurred_at": "2025-01-01T23:30:00+08:00",
    "type": "purchase", "amount": "12.50", "currency": "CNY",
}
CONTACT: dict[str, Any] = {
    "event_id": "i-1", "customer_id": "c-1", "occurred_at": "2025-01-01T09:00:00Z", "type": "visit",
}


def raw(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = dict(base)
    for name, value in changes.items():
        if value is _DROP:
            doc.pop(name, None)
        else:
            doc[name] = value
    return doc


_DROP = object()


def reason_txn(value: bytes | None, key: bytes | None = b"c-1", check_key: bool = True) -> str:
    with pytest.raises(InvalidEvent) as caught:
        decode_transaction(value, key, check_key)
    assert caught.value.message  # every refusal says what is wrong
    return caught.value.reason


def test_valid_transaction() -> None:
    txn = decode_transaction(raw(TXN), b"c-1")
    assert (txn.event_id, txn.customer_id, txn.refund, txn.amount_minor, txn.currency) == ("t-1", "c-1", False, 1250, "CNY")
    assert txn.occurred_at == datetime(2025, 1, 1, 15, 30, tzinfo=timezone.utc)
    assert txn.occurred_at.utcoffset() == timedelta(hours=8)


@pytest.mark.parametrize(("amount", "minor"), [("12.50", 1250), (12.5, 1250), (12, 1200), ("1e2", 10000)])
def test_amount_as_string_or_number(amount, minor) -> None:
    assert decode_transaction(raw(with_(TXN, amount=amount)), b"c-1").amount_minor == minor


def test_refund_z_offset_and_unknown_fields() -> None:
    doc = with_(TXN, type="refund", occurred_at="2025-01-01T15:30:00Z", loyalty_tier="gold", nested={"a": [1, 2]})
    txn = decode_transaction(raw(doc), b"c-1")
    assert txn.refund and txn.amount_minor == 1250
    assert txn.occurred_at == datetime(2025, 1, 1, 15, 30, tzinfo=timezone.utc)


def test_valid_interaction() -> None:
    contact = decode_interaction(raw(with_(CONTACT, attributes={"room": 3}, extra=1)), b"c-1")
    assert (contact.type, contact.attributes) == ("visit", {"room": 3})
    assert contact.occurred_at.tzinfo is not None


@pytest.mark.parametrize(("value", "reason"), [
    (b'{"event_id": "t-1",', "malformed_json"),
    (b"\xff\xfe{}", "malformed_json"),
    ('{"event_id": "t-1", "customer_id": "c\udce9"}'.encode("utf-8", "surrogateescape"), "malformed_json"),
    (b"[1, 2]", "invalid_field"),
    (b'"text"', "invalid_field"),
    (b"null", "invalid_field"),
    (None, "tombstone"),
    (raw(with_(TXN, event_id=_DROP)), "invalid_field"),
    (raw(with_(TXN, event_id="")), "invalid_field"),
    (raw(with_(TXN, event_id=7)), "invalid_field"),
    (raw(with_(TXN, event_id="x" * 257)), "invalid_field"),
    (raw(with_(TXN, customer_id=_DROP)), "invalid_field"),
    (raw(with_(TXN, customer_id="")), "invalid_field"),
    (raw(with_(TXN, customer_id=["c-1"])), "invalid_field"),
    (raw(with_(TXN, type="sale")), "unknown_type"),
    (raw(with_(TXN, type=_DROP)), "unknown_type"),
    (raw(with_(TXN, amount="NaN")), "invalid_amount"),
    (b'{"event_id":"t-1","customer_id":"c-1","occurred_at":"2025-01-01T23:30:00+08:00","type":"purchase",'
     b'"currency":"CNY","amount":NaN}', "malformed_json"),
    (raw(with_(TXN, amount="Infinity")), "invalid_amount"),
    (raw(with_(TXN, amount="-1")), "invalid_amount"),
    (raw(with_(TXN, amount=-1)), "invalid_amount"),
    (raw(with_(TXN, amount="0")), "invalid_amount"),
    (raw(with_(TXN, amount="1.234")), "invalid_amount"),
    (raw(with_(TXN, amount="abc")), "invalid_amount"),
    (raw(with_(TXN, amount="1" * 40)), "invalid_amount"),
    (raw(with_(TXN, amount=int("1" * 40))), "invalid_amount"),
    (raw(with_(TXN, amount=True)), "invalid_amount"),
    (raw(with_(TXN, amount=None)), "invalid_amount"),
    (raw(with_(TXN, amount=_DROP)), "invalid_field"),
    (raw(with_(TXN, occurred_at="2025-01-01T23:30:00")), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at="2025-01-01")), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at=1735745400)), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at="1735745400")), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at="20250101T233000+0800")), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at="2025-02-30T10:00:00+08:00")), "invalid_timestamp"),
    (raw(with_(TXN, occurred_at=_DROP)), "invalid_field"),
    (raw(with_(TXN, currency="XYZ")), "invalid_currency"),
    (raw(with_(TXN, currency="cny")), "invalid_currency"),
    (raw(with_(TXN, currency=156)), "invalid_currency"),
    (raw(with_(TXN, order_id=12)), "invalid_field"),
    (raw(with_(TXN, attributes=[1])), "invalid_field"),
])
def test_transaction_refusals(value, reason) -> None:
    assert reason_txn(value) == reason


def test_key_must_be_the_customer() -> None:
    assert reason_txn(raw(TXN), key=b"c-2") == "key_mismatch"
    assert reason_txn(raw(TXN), key=None) == "key_mismatch"
    assert decode_transaction(raw(TXN), b"c-2", check_key=False).customer_id == "c-1"
    with pytest.raises(InvalidEvent) as caught:
        decode_interaction(raw(CONTACT), b"c-9")
    assert caught.value.reason == "key_mismatch"


@pytest.mark.parametrize(("doc", "reason"), [
    (with_(CONTACT, type="purchase"), "unknown_type"),
    (with_(CONTACT, type=None), "unknown_type"),
    (with_(CONTACT, occurred_at="2025-01-01 09:00:00"), "invalid_timestamp"),
    (with_(CONTACT, attributes="x"), "invalid_field"),
    (with_(CONTACT, customer_id=None), "invalid_field"),
])
def test_interaction_refusals(doc, reason) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_interaction(raw(doc), b"c-1")
    assert caught.value.reason == reason


# --- agreement with the pydantic contract -------------------------------------------------------


def fast_accepts(model: type, value: bytes) -> bool:
    decode = decode_transaction if model is Transaction else decode_interaction
    try:
        decode(value, None, check_key=False)
    except InvalidEvent:
        return False
    return True


def model_accepts(model: type[BaseModel], value: bytes) -> bool:
    try:
        model.model_validate_json(value)
    except ValidationError:
        return False
    return True


ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 0.5, 12.3, 0.1 + 0.2, 1e300, 10 ** 20, int("9" * 40), "", " ", "x", "12.50", "12.5",
    "1.234", "1e3", "1E-2", " 12.5", "12.5 ", "1_000", "+5", "-0", "0.00", "NaN", "nan", "Infinity", "-Infinity",
    "0x10", "١٢", "12,50", [], [1], {}, {"a": 1}, "x" * 300, "c-1", "CNY", "cny", "JPY", "KWD", "XYZ", "purchase",
    "refund", "visit", "sale", "2025-01-01T23:30:00+08:00", "2025-01-01T23:30:00Z", "2025-01-01t23:30:00z",
    "2025-01-01 23:30:00+08:00", "2025-01-01T23:30:00", "2025-01-01", "2025-01-01T23:30+08:00",
    "2025-01-01T23:30:00.123456789+08:00", "20250101T233000+0800", "2025-W01-3T23:30:00+08:00", "1735745400",
    1735745400, 1735745400.5, "2025-02-30T00:00:00Z", "2025-01-01T24:00:00Z", "2025-01-01T23:30:00+24:00",
    "2025-01-01T23:30:00-00:00", "2025-01-01T23:30:60Z", "2025-01-01T23:30:00+0800", "2025-01-01T23:30:00+08",
]
FIELDS = ["event_id", "customer_id", "occurred_at", "type", "amount", "currency", "order_id", "channel",
          "attributes", "extra"]


def _corpus() -> list[tuple[type, bytes]]:
    corpus: list[tuple[type, bytes]] = [(Transaction, raw(TXN)), (Interaction, raw(CONTACT))]
    for model, base in ((Transaction, TXN), (Interaction, CONTACT)):
        for name in FIELDS:
            corpus.append((model, raw(with_(base, **{name: _DROP}))))
            for value in ODD_VALUES:
                corpus.append((model, raw(with_(base, **{name: value}))))
    for kind in INTERACTION_TYPES:
        corpus.append((Interaction, raw(with_(CONTACT, type=kind))))
    corpus += [(Transaction, v) for v in (b"", b"[]", b"null", b"{}", b"\xef\xbb\xbf" + raw(TXN), raw(TXN) + b" x",
                                          raw(TXN)[:-1] + b', "x": NaN}', raw(TXN)[:-1] + b', "amount": "-1"}',
                                          raw(TXN)[:-1] + b', "x": "\\ud800"}', b"\xff")]
    return corpus


def test_fast_decoder_agrees_with_the_models_on_a_hand_written_corpus() -> None:
    corpus = _corpus()
    assert len(corpus) > 1000
    disagreements = [(model.__name__, value[:200]) for model, value in corpus
                     if fast_accepts(model, value) != model_accepts(model, value)]
    assert disagreements == []
    # The corpus exercises both verdicts.
    verdicts = {fast_accepts(model, value) for model, value in corpus}
    assert verdicts == {True, False}


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10 ** 25, max_value=10 ** 25),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.sampled_from(ODD_VALUES[:60]),
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from([Transaction, Interaction]),
    mutations=st.dictionaries(st.sampled_from(FIELDS + ["note"]), st.none() | json_value, max_size=4),
    drops=st.sets(st.sampled_from(FIELDS)),
)
def test_fast_decoder_agrees_with_the_models_on_mutated_events(model, mutations, drops) -> None:
    doc = dict(TXN if model is Transaction else CONTACT)
    for name in drops:
        doc.pop(name, None)
    doc.update(mutations)
    value = json.dumps(doc).encode()  # may carry NaN/Infinity literals, as a careless producer would
    assert fast_accepts(model, value) == model_accepts(model, value), value
