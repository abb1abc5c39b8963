"""Helpers for the rules tests: local times and states built from purchases."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from rules import windows
from rules.engine import CompiledRuleset
from rules.state import CustomerState, apply_transaction

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(day: date, hour: int = 12, minute: int = 0, tz: ZoneInfo = SHANGHAI) -> datetime:
    """An aware datetime on ``day`` at local ``hour:minute`` in ``tz``."""
    return datetime.combine(day, time(hour, minute), tzinfo=tz)


def buy(state: CustomerState, moment: datetime, amount_minor: int, rs: CompiledRuleset, refund: bool = False) -> None:
    """Fold one purchase (or refund) at ``moment`` into ``state`` the way the processor does."""
    apply_transaction(state, moment.timestamp(), windows.local_day(moment, rs.tz), refund, amount_minor)


def customer(rs: CompiledRuleset, as_of: datetime, recency_days: int | None, purchases: int, net_minor: int) -> CustomerState:
    """A state with ``purchases`` purchases totalling ``net_minor``, all ``recency_days`` local days before ``as_of``."""
    state = CustomerState()
    if recency_days is None:
        assert purchases == 0
        return state
    day = as_of.astimezone(rs.tz).date() - timedelta(days=recency_days)
    for i in range(purchases):
        share = net_minor // purchases + (net_minor % purchases if i == 0 else 0)
        buy(state, at(day, 10, i % 60, rs.tz), share, rs)
    return state
