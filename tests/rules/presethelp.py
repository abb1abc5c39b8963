"""Helpers for preset tests: events as the contract writes them, folded and graded like the worker does."""

from __future__ import annotations

import itertools
from datetime import date, datetime, time, timedelta
from typing import Any

import orjson

from rules import windows
from rules.engine import CompiledRuleset, Evaluation, compile_ruleset, evaluate
from rules.ruleset import load
from rules.state import CustomerState, fold, prune
from schemas.decode import decode_interaction, decode_transaction
from schemas.events import INTERACTION_TYPES

_ids = itertools.count()
_cache: dict[str, CompiledRuleset] = {}


def preset(name: str) -> CompiledRuleset:
    if name not in _cache:
        _cache[name] = compile_ruleset(load(name))
    return _cache[name]


def local(day: date | str, hour: int = 12) -> datetime:
    """Noon (or ``hour``) of a Shanghai calendar day, as an aware datetime."""
    from zoneinfo import ZoneInfo

    d = date.fromisoformat(day) if isinstance(day, str) else day
    return datetime.combine(d, time(hour), tzinfo=ZoneInfo("Asia/Shanghai"))


def txn(when: datetime, kind: str, amount: str | int, customer: str = "c1", **extra: Any) -> dict[str, Any]:
    return {"event_id": f"t{next(_ids)}", "customer_id": customer, "occurred_at": when.isoformat(), "type": kind,
            "amount": str(amount), "currency": "CNY", **extra}


def contact(when: datetime, kind: str, customer: str = "c1", **attributes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"event_id": f"i{next(_ids)}", "customer_id": customer, "occurred_at": when.isoformat(),
                           "type": kind}
    if attributes:
        doc["attributes"] = attributes
    return doc


def state_of(rs: CompiledRuleset, events: list[dict[str, Any]]) -> CustomerState:
    """Fold ``events`` (in the given order) into a fresh state, pruning as the processor does."""
    state = CustomerState()
    for doc in events:
        fold_one(rs, state, doc)
    return state


def grade_of(rs: CompiledRuleset | str, events: list[dict[str, Any]], as_of: datetime | None = None,
             population: Any = None, ladder: str | None = None) -> tuple[str, Evaluation]:
    """The grade (of ``ladder``, or the only ladder) after ``events``, as of ``as_of`` or the last event."""
    if isinstance(rs, str):
        rs = preset(rs)
    state = state_of(rs, events)
    if as_of is None:
        as_of = max(datetime.fromisoformat(e["occurred_at"]) for e in events) if events else local("2026-01-01")
    ev = evaluate(rs, state, as_of, population)
    name = ladder or rs.ladders[0].name
    return ev.grades[name], ev


def days_later(moment: datetime, days: int) -> datetime:
    return moment + timedelta(days=days)


def fold_one(rs: CompiledRuleset, state: CustomerState, doc: dict[str, Any]) -> None:
    """Fold one event document into ``state`` and prune, as the processor does."""
    raw = orjson.dumps(doc)
    event = decode_interaction(raw, check_key=False) if doc["type"] in INTERACTION_TYPES and "amount" not in doc \
        else decode_transaction(raw, check_key=False)
    fold(state, event, rs.track, rs.tz)
    assert state.last_event_ts is not None
    prune(state, windows.day_of_ts(state.last_event_ts, rs.tz), rs.retention_days)
