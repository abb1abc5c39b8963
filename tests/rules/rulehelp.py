"""Helpers for the rules tests: local times, states built from purchases, the shared two-ladder ruleset."""

from __future__ import annotations

from collections.abc import Sequence
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


def two_ladder_ruleset(ruleset_id: str, intent_rules: Sequence[str], *, attributes: str = "{stage: text}",
                       intent_hysteresis: str | None = None) -> str:
    """YAML of the two-ladder ruleset the multi-ladder tests share, side by side for the same customers.

    ``value`` (from transactions): VIP above 10,000 of 365-day net spend, A from 5,000, B from
    1,000, else C; VIP and A are key grades. ``intent`` (from interactions): S, A, B, C, D, the
    first of ``intent_rules`` that holds (flow-style rule mappings), else D; S and A are key
    grades; ``intent_hysteresis`` is its ``hysteresis:`` mapping, if any. ``attributes`` declares
    the interaction attributes the rules read.
    """
    rules = "".join(f"        - {rule}\n" for rule in intent_rules)
    hysteresis = f"    hysteresis: {intent_hysteresis}\n" if intent_hysteresis else ""
    return f"""\
id: {ruleset_id}
version: "1"
attributes: {attributes}
ladders:
  value:
    grades: [VIP, A, B, C]
    key: [VIP, A]
    decide:
      metric: purchases.net.365d
      bands: [{{above: 10000, grade: VIP}}, {{min: 5000, grade: A}}, {{min: 1000, grade: B}}]
      else: C
  intent:
    grades: [S, A, B, C, D]
    key: [S, A]
{hysteresis}    decide:
      rules:
{rules}      else: D
"""
