"""Erased customers, without I/O: the refusal markers and the question "is this event erased?".

An erasure leaves one thing behind on purpose: a *refusal marker*, so that a replay of input
events older than the erasure cannot bring the customer back. The marker holds no personal
data: its key is ``HMAC-SHA256(GRADEFLOW_ERASURE_KEY, customer_id)`` (hex), its value the
erasure instant. Without the key nobody can tell whose marker it is, not even by hashing a list
of likely ids (a plain hash would allow that: customer ids are rarely secret). docs/erasure.md.

Refusing is per event: an event of an erased customer that occurred at or before the erasure
instant is refused; a later one starts a new customer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

# Erasure instants are kept as seconds since the epoch (event times are, rules/state.py).


def marker_key(secret: bytes, customer_id: str) -> bytes:
    """The refusal marker's key of ``customer_id``: HMAC-SHA256 under ``secret``, hex (ASCII bytes)."""
    return hmac.new(secret, customer_id.encode("utf-8"), hashlib.sha256).hexdigest().encode("ascii")


def encode_instant(ts: float) -> bytes:
    """A marker's value: the erasure instant (seconds since the epoch)."""
    return repr(float(ts)).encode("ascii")


def decode_instant(raw: bytes) -> float:
    return float(raw.decode("ascii"))


class Erasures:
    """Every erasure a worker knows of: marker key → erasure instant (the latest, if erased twice).

    The hot path asks :meth:`erased_at` once per customer of a batch, and only while there is at
    least one erasure (an HMAC costs about a microsecond).
    """

    __slots__ = ("secret", "markers")

    def __init__(self, secret: bytes, markers: Iterable[tuple[bytes, float]] = ()) -> None:
        if not secret:
            raise ValueError("an erasure key must not be empty")
        self.secret = secret
        self.markers: dict[bytes, float] = {}
        for key, ts in markers:
            self.add(key, ts)

    def __len__(self) -> int:
        return len(self.markers)

    def __repr__(self) -> str:  # the secret never shows
        return f"Erasures({len(self.markers)} markers)"

    def key(self, customer_id: str) -> bytes:
        return marker_key(self.secret, customer_id)

    def add(self, key: bytes, ts: float) -> bool:
        """Record a marker; True when it is new or moves the instant later (erasing twice keeps the later)."""
        held = self.markers.get(key)
        if held is not None and held >= ts:
            return False
        self.markers[key] = ts
        return True

    def erase(self, customer_id: str, ts: float) -> bytes:
        """Record the erasure of ``customer_id`` at ``ts``; return its marker key."""
        key = self.key(customer_id)
        self.add(key, ts)
        return key

    def erased_at(self, customer_id: str) -> float | None:
        """The erasure instant of ``customer_id``, or None when they were never erased."""
        if not self.markers:
            return None
        return self.markers.get(marker_key(self.secret, customer_id))

    def refuses(self, customer_id: str, occurred_ts: float) -> bool:
        """Whether an event of ``customer_id`` that occurred at ``occurred_ts`` belongs to an erased customer."""
        at = self.erased_at(customer_id)
        return at is not None and occurred_ts <= at
