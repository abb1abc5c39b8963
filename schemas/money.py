"""Exact money: amounts as integer minor units of an ISO 4217 currency."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from schemas.errors import InvalidEvent

# Minor-unit exponents of the currencies gradeflow accepts. Not the whole of
# ISO 4217 on purpose: a currency a ruleset cannot price is refused loudly.
CURRENCY_EXPONENTS: dict[str, int] = {
    "CNY": 2, "HKD": 2, "TWD": 2, "USD": 2, "EUR": 2, "GBP": 2, "SGD": 2,
    "AUD": 2, "CAD": 2, "CHF": 2, "SEK": 2, "NOK": 2, "DKK": 2, "INR": 2,
    "MYR": 2, "THB": 2, "PHP": 2, "IDR": 2, "VND": 0, "JPY": 0, "KRW": 0,
    "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3,
}

# A single event larger than this (in major units) is a data error, not a sale.
MAX_DIGITS = 18


def to_minor(amount: object, currency: str) -> int:
    """Parse a positive, finite amount into integer minor units of ``currency``.

    Accepts a decimal string or a JSON number (int or float as parsed by the
    JSON decoder; a float is read through its shortest repr so that 12.3 stays
    12.3). Refuses NaN, infinities, zero, negatives, more decimals than the
    currency has, and absurdly long numbers.
    """
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise InvalidEvent("invalid_currency", f"currency {currency!r} is not a supported ISO 4217 code")
    if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
        raise InvalidEvent("invalid_amount", f"amount must be a decimal string or number, got {type(amount).__name__}")
    try:
        value = Decimal(amount if isinstance(amount, str) else repr(amount))
    except InvalidOperation:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} is not finite")
    if value <= 0:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} must be greater than 0")
    sign, digits, exp = value.as_tuple()
    assert isinstance(exp, int)
    if len(digits) + exp > MAX_DIGITS:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} has more than {MAX_DIGITS} integer digits")
    scaled = value.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise InvalidEvent(
            "invalid_amount",
            f"amount {str(amount)[:40]!r} has more decimals than {currency} allows ({exponent})",
        )
    return int(scaled)


def format_minor(minor: int, currency: str) -> str:
    """Render minor units as a plain decimal string (``12345`` CNY → ``"123.45"``)."""
    exponent = CURRENCY_EXPONENTS[currency]
    return str(Decimal(minor).scaleb(-exponent)) if exponent else str(minor)


def major_to_minor(value: Decimal | int | str, currency: str) -> int:
    """Convert a threshold written in major units (rule files) to minor units, exactly."""
    scaled = Decimal(str(value)).scaleb(CURRENCY_EXPONENTS[currency])
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{value} has more decimals than {currency} allows")
    return int(scaled)
