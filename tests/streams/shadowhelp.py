"""A generated purchase history for the shadow tests (as JSON Lines documents, in order)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

TZ = timezone(timedelta(hours=8))


def history(seed: int = 3, customers: int = 150, events: int = 450) -> list[dict[str, object]]:
    """Purchases and refunds of ``customers`` over about five months, in time order: recency bands
    and the spend bands of rfm-5 and its candidates are crossed often."""
    rng = random.Random(seed)
    names = [f"c{i:03d}" for i in range(customers)]
    t = datetime(2026, 1, 5, 9, tzinfo=TZ)
    out: list[dict[str, object]] = []
    for n in range(events):
        t += timedelta(hours=rng.choice([1, 3, 5, 8]))
        refund = rng.random() < 0.08
        out.append({"event_id": f"e{n}", "customer_id": rng.choice(names), "occurred_at": t.isoformat(),
                    "type": "refund" if refund else "purchase",
                    "amount": f"{rng.choice([300, 900, 1600, 2400, 4000]) * (0.5 if refund else 1):.2f}",
                    "currency": "CNY"})
    return out


def write_history(path: Path, docs: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    return path
