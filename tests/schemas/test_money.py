"""Exact money (schemas/money.py): integer minor units, never floats."""

from __future__ import annotations

from decimal import Context, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidEvent
from schemas.money import CURRENCY_EXPONENTS, decimal_to_minor, format_minor, major_to_minor, parse_amount, to_minor


@pytest.mark.parametrize(("amount", "currency", "minor"), [
    ("12.30", "CNY", 1230), ("12.3", "CNY", 1230), (12.3, "CNY", 1230), ("0.01", "CNY", 1), (100, "CNY", 10000),
    ("1e3", "CNY", 100000), ("1.5E1", "CNY", 1500),
    ("0.3", "CNY", 30), (0.1, "CNY", 10),  # a JSON 0.1 is read as the decimal 0.1, not 0.1000000000000000055…
    ("1000", "JPY", 1000), (1000, "JPY", 1000), ("1000.0", "JPY", 1000),
    ("1.234", "KWD", 1234), ("0.001", "KWD", 1), (2.5, "KWD", 2500),
    ("999999999999999999.99", "CNY", 99999999999999999999),  # 18 integer digits, exactly
])
def test_to_minor_is_exact(amount, currency, minor) -> None:
    result = to_minor(amount, currency)
    assert result == minor and type(result) is int


@pytest.mark.parametrize(("amount", "currency", "words"), [
    (0.1 + 0.2, "CNY", "more decimals"),  # 0.30000000000000004 is not a whole number of fen
    ("1.234", "CNY", "more decimals"), ("0.5", "JPY", "more decimals"), ("1.2345", "KWD", "more decimals"),
    ("1.000000000000000000000000000001", "CNY", "more decimals"),  # beyond Decimal's 28-digit context
    ("0." + "0" * 40 + "1", "CNY", "more decimals"),
    ("0", "CNY", "greater than 0"), (0, "CNY", "greater than 0"), ("-1", "CNY", "greater than 0"),
    ("0.00", "CNY", "greater than 0"),
    ("NaN", "CNY", "not a decimal"), ("Infinity", "CNY", "not a decimal"), (float("inf"), "CNY", "not finite"),
    (float("nan"), "CNY", "not finite"),
    ("abc", "CNY", "not a decimal"), ("", "CNY", "not a decimal"), (" 12.5", "CNY", "not a decimal"),
    ("12.5\n", "CNY", "not a decimal"), ("1_000", "CNY", "not a decimal"), ("+5", "CNY", "not a decimal"),
    ("1" * 19, "CNY", "integer digits"), ("1e18", "CNY", "integer digits"), (10 ** 39, "CNY", "integer digits"),
    (True, "CNY", "got bool"), (None, "CNY", "got NoneType"), ([1], "CNY", "got list"),
])
def test_to_minor_refuses(amount, currency, words) -> None:
    with pytest.raises(InvalidEvent) as caught:
        to_minor(amount, currency)
    assert caught.value.reason == "invalid_amount"
    assert words in caught.value.message


def test_to_minor_refuses_unknown_currency() -> None:
    with pytest.raises(InvalidEvent) as caught:
        to_minor("1", "XYZ")
    assert caught.value.reason == "invalid_currency"


@pytest.mark.parametrize(("minor", "currency", "text"), [
    (1230, "CNY", "12.30"), (1, "CNY", "0.01"), (0, "CNY", "0.00"), (-15050, "CNY", "-150.50"),
    (5_000_000, "CNY", "50000.00"), (1000, "JPY", "1000"), (0, "JPY", "0"), (1234, "KWD", "1.234"),
    (10 ** 30 + 1, "CNY", "1" + "0" * 28 + ".01"),  # more digits than Decimal's default context keeps
])
def test_format_minor(minor, currency, text) -> None:
    assert format_minor(minor, currency) == text


@given(st.integers(-10 ** 40, 10 ** 40), st.sampled_from(["CNY", "JPY", "KWD", "BHD", "USD"]))
def test_format_minor_is_the_exact_decimal(minor: int, currency: str) -> None:
    text = format_minor(minor, currency)
    assert Decimal(text) == Decimal(minor).scaleb(-CURRENCY_EXPONENTS[currency], Context(prec=100))
    assert text.count(".") == (1 if CURRENCY_EXPONENTS[currency] else 0) and not text.startswith(("-.", "."))
    if "." in text:
        assert len(text.split(".")[1]) == CURRENCY_EXPONENTS[currency]


@given(st.text(alphabet="0123456789.-+eE _", min_size=1, max_size=24) | st.from_regex(r"[0-9]{1,20}(\.[0-9]{0,5})?", fullmatch=True),
       st.sampled_from(["CNY", "JPY", "KWD"]))
def test_the_plain_path_agrees_with_decimal(text: str, currency: str) -> None:
    """to_minor's shortcut for plain decimal strings gives what the Decimal path gives, or defers to it."""
    def verdict(f):  # noqa: ANN001, ANN202
        try:
            return f()
        except InvalidEvent as error:
            return error.reason
    assert verdict(lambda: to_minor(text, currency)) == verdict(lambda: decimal_to_minor(parse_amount(text), currency))


def test_round_trip_through_text() -> None:
    for minor in (1, 9, 10, 99, 100, 12345, 10 ** 17 + 7):
        for currency in ("CNY", "JPY", "KWD"):
            assert to_minor(format_minor(minor, currency), currency) == minor


def test_major_to_minor_for_rule_thresholds() -> None:
    assert major_to_minor(Decimal("50000"), "CNY") == 5_000_000
    assert major_to_minor("0.01", "CNY") == 1
    assert major_to_minor(5, "KWD") == 5000
    with pytest.raises(ValueError):
        major_to_minor("0.001", "CNY")
    with pytest.raises(ValueError):
        major_to_minor("1.000000000000000000000000000001", "CNY")
