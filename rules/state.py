"""Per-customer rolling state, compact in memory and on the changelog.

One :class:`CustomerState` per customer holds everything the rules need:
recency, daily purchase buckets of the longest window, interaction history
(last time and counts by type), the grade last emitted on each ladder, and the
offset of the last applied record of each input topic (so that a replay after
a crash does not apply a record twice). It serializes to a short JSON array.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from rules import windows

_FORMAT = 1


@dataclass(slots=True)
class CustomerState:
    """Everything gradeflow remembers about one customer."""

    last_event_ts: float | None = None
    last_purchase_ts: float | None = None
    first_purchase_ts: float | None = None
    buckets: windows.Buckets = field(default_factory=dict)
    last_interaction_ts: float | None = None
    interaction_counts: dict[str, int] = field(default_factory=dict)
    grades: dict[str, str] = field(default_factory=dict)
    # Offset of the last applied record per input topic role ("t", "i").
    offsets: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialize to the changelog format (a JSON array, versioned)."""
        return orjson.dumps([
            _FORMAT,
            self.last_event_ts,
            self.last_purchase_ts,
            self.first_purchase_ts,
            [[day, c, n] for day, (c, n) in self.buckets.items()],
            self.last_interaction_ts,
            self.interaction_counts,
            self.grades,
            self.offsets,
        ])

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CustomerState":
        """Inverse of :meth:`to_bytes`."""
        doc = orjson.loads(raw)
        if doc[0] != _FORMAT:
            raise ValueError(f"unknown customer state format {doc[0]!r}")
        return cls(
            last_event_ts=doc[1],
            last_purchase_ts=doc[2],
            first_purchase_ts=doc[3],
            buckets={d: [c, n] for d, c, n in doc[4]},
            last_interaction_ts=doc[5],
            interaction_counts=doc[6],
            grades=doc[7],
            offsets=doc[8],
        )


def _later(current: float | None, ts: float) -> float:
    return ts if current is None or ts > current else current


def apply_transaction(state: CustomerState, ts: float, day: int, refund: bool, amount_minor: int) -> None:
    """Fold one purchase or refund into ``state``.

    A refund lowers the net amount of the day it happened on and changes
    neither recency nor frequency: the customer did not buy.
    """
    state.last_event_ts = _later(state.last_event_ts, ts)
    if refund:
        windows.add(state.buckets, day, 0, -amount_minor)
        return
    windows.add(state.buckets, day, 1, amount_minor)
    state.last_purchase_ts = _later(state.last_purchase_ts, ts)
    if state.first_purchase_ts is None or ts < state.first_purchase_ts:
        state.first_purchase_ts = ts


def apply_interaction(state: CustomerState, ts: float, kind: str) -> None:
    """Fold one interaction into ``state``: last time and count by type."""
    state.last_event_ts = _later(state.last_event_ts, ts)
    state.last_interaction_ts = _later(state.last_interaction_ts, ts)
    state.interaction_counts[kind] = state.interaction_counts.get(kind, 0) + 1
