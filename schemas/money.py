"""Exact money: amounts as integer minor units of an ISO 4217 currency."""

from __future__ import annotations

import re
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


# A decimal string as JSON writes numbers: digits, optional fraction, optional
# exponent. No spaces, underscores, "NaN" or "Infinity" (Python's Decimal
# would take them; the contract does not).
AMOUNT_PATTERN = r"^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$"
_AMOUNT_RE = re.compile(AMOUNT_PATTERN)


def parse_amount(amount: object) -> Decimal:
    """Parse a positive, finite amount (decimal string or JSON number) exactly.

    A float is read through its shortest repr so that 12.3 stays 12.3. Refuses
    NaN, infinities, zero, negatives and absurdly long numbers. The currency's
    decimals are checked by :func:`decimal_to_minor`.
    """
    if isinstance(amount, bool) or not isinstance(amount, (str, int, float, Decimal)):
        raise InvalidEvent("invalid_amount", f"amount must be a decimal string or number, got {type(amount).__name__}")
    if isinstance(amount, str) and not _AMOUNT_RE.fullmatch(amount):
        raise InvalidEvent("invalid_amount", f"amount {amount[:40]!r} is not a decimal number")
    try:
        value = amount if isinstance(amount, Decimal) else Decimal(amount if isinstance(amount, str) else repr(amount))
    except InvalidOperation:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} is not finite")
    if value <= 0:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} must be greater than 0")
    _, digits, exp = value.as_tuple()
    assert isinstance(exp, int)
    if len(digits) + exp > MAX_DIGITS:
        raise InvalidEvent("invalid_amount", f"amount {str(amount)[:40]!r} has more than {MAX_DIGITS} integer digits")
    return value


def _scaled_exactly(value: Decimal, exponent: int) -> int | None:
    """``value × 10**exponent`` as an int, or None if that is not a whole number.

    Integer arithmetic only: ``Decimal.scaleb`` rounds to the context's 28
    digits and would turn 1.000…0001 into a whole number of cents.
    """
    sign, digits, exp = value.as_tuple()
    assert isinstance(exp, int)
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exp + exponent
    if shift >= 0:
        result = coefficient * 10 ** shift
    elif coefficient == 0:
        result = 0
    elif -shift > len(digits):
        return None  # a non-zero coefficient below 10**len(digits) cannot divide by 10**-shift
    else:
        result, rest = divmod(coefficient, 10 ** -shift)
        if rest:
            return None
    return -result if sign else result


def decimal_to_minor(value: Decimal, currency: str) -> int:
    """A parsed amount in integer minor units of ``currency``, refusing extra decimals."""
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise InvalidEvent("invalid_currency", f"currency {currency!r} is not a supported ISO 4217 code")
    minor = _scaled_exactly(value, exponent)
    if minor is None:
        raise InvalidEvent(
            "invalid_amount",
            f"amount {str(value)[:40]!r} has more decimals than {currency} allows ({exponent})",
        )
    return minor


# The common case on the hot path, a plain decimal string (ASCII digits, at most one point with
# at least one digit on each side and no more decimals than the currency has) or an integer, is
# converted with integer arithmetic; everything else (and every error message) goes through Decimal.
_SCALE = tuple(10 ** e for e in range(max(CURRENCY_EXPONENTS.values()) + 1))


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
    if type(amount) is str:
        whole, point, fraction = amount.partition(".")
        if (whole.isascii() and whole.isdigit() and len(whole) <= MAX_DIGITS
                and (not point or (fraction.isascii() and fraction.isdigit() and len(fraction) <= exponent))):
            minor = int(whole) * _SCALE[exponent]
            if fraction:
                minor += int(fraction) * _SCALE[exponent - len(fraction)]
            if minor > 0:
                return minor
    elif type(amount) is int and 0 < amount < 10 ** MAX_DIGITS:
        return amount * _SCALE[exponent]
    return decimal_to_minor(parse_amount(amount), currency)


def format_minor(minor: int, currency: str) -> str:
    """Render minor units as a plain decimal string (``12345`` CNY → ``"123.45"``)."""
    exponent = CURRENCY_EXPONENTS[currency]
    if not exponent:
        return str(minor)
    # The digits, split: exact at any size (Decimal.scaleb would round past 28 digits), and several
    # times cheaper than a nested format spec, which a grade change used to build four times.
    digits = str(-minor if minor < 0 else minor)
    if len(digits) <= exponent:
        digits = "0" * (exponent + 1 - len(digits)) + digits
    return ("-" if minor < 0 else "") + digits[:-exponent] + "." + digits[-exponent:]


def major_to_minor(value: Decimal | int | str, currency: str) -> int:
    """Convert a threshold written in major units (rule files) to minor units, exactly."""
    minor = _scaled_exactly(Decimal(str(value)), CURRENCY_EXPONENTS[currency])
    if minor is None:
        raise ValueError(f"{value} has more decimals than {currency} allows")
    return minor
