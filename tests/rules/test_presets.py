"""Every grading scheme of docs/grading-schemes.md, tested with the numbers of its source document."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rules.ruleset import PRESETS_DIR, load
from tests.rules.presethelp import contact, grade_of, local, preset, txn

D0 = local("2026-03-10")

SCHEMES_DOC = Path(__file__).resolve().parents[2] / "docs" / "grading-schemes.md"


def _documented() -> tuple[list[str], set[str]]:
    """The presets the schemes table names (first column) and the source titles the sources table lists."""
    text = SCHEMES_DOC.read_text(encoding="utf-8")
    schemes = text.split("## The schemes", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([a-z0-9-]+)`", schemes, flags=re.MULTILINE)
    sources = text.split("## Sources", 1)[1].split("\n## ", 1)[0]
    titles = set(re.findall(r"^\| (《[^》]+》)", sources, flags=re.MULTILINE))
    return names, titles


def test_every_documented_scheme_is_shipped_and_loads() -> None:
    names, titles = _documented()
    assert titles, "no source titles found in the sources table"
    shipped = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    assert shipped == sorted(names)
    for name in names:
        text = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        header = text.split("\nid:")[0]
        # Each says what it grades, its source (by a title the sources table lists) and its choices.
        assert header.startswith(f"# {name}:"), name
        assert "Source:" in header and any(title in header for title in titles), name
        assert "Choices where the source is vague:" in header, name
        assert load(name).id == name


# ---------------------------------------------------------------- annual-sales-vip (002)

@pytest.mark.parametrize(("amount", "grade"), [
    ("10000001", "VIP"), ("10000000.01", "VIP"), ("10000000", "A"), ("5000000", "A"), ("4999999.99", "B"),
    ("2000000", "B"), ("1999999.99", "C"), ("1", "C"),
])
def test_annual_sales_vip_bounds_from_the_source(amount, grade) -> None:
    assert grade_of("annual-sales-vip", [txn(D0, "purchase", amount)])[0] == grade


def test_annual_sales_vip_is_net_of_refunds_over_365_days() -> None:
    events = [txn(D0, "purchase", "6000000"), txn(D0 + timedelta(days=100), "purchase", "4000001"),
              txn(D0 + timedelta(days=101), "refund", "1")]
    assert grade_of("annual-sales-vip", events)[0] == "A"  # exactly 10,000,000 net
    assert grade_of("annual-sales-vip", events[:2])[0] == "VIP"
    # The first purchase leaves the window 365 days after it.
    assert grade_of("annual-sales-vip", events[:2], as_of=D0 + timedelta(days=364))[0] == "VIP"
    assert grade_of("annual-sales-vip", events[:2], as_of=D0 + timedelta(days=365))[0] == "B"


# ---------------------------------------------------------------- rfm-8

@pytest.mark.parametrize(("recent", "frequent", "big", "segment"), [
    (True, True, True, "important_value"), (True, False, True, "important_develop"),
    (False, True, True, "important_retain"), (False, False, True, "important_winback"),
    (True, True, False, "general_value"), (True, False, False, "general_develop"),
    (False, True, False, "general_retain"), (False, False, False, "general_winback"),
])
def test_rfm8_segments(recent, frequent, big, segment) -> None:
    last = D0 - timedelta(days=30 if recent else 31)
    n = 3 if frequent else 2
    total = 5000 if big else 4999
    events = [txn(last - timedelta(days=i), "purchase", "0.01") for i in range(n)]  # the first: the rest of the total
    events[0]["amount"] = f"{total - 0.01 * (n - 1):.2f}"
    grade, ev = grade_of("rfm-8", events, as_of=D0)
    assert grade == segment, ev.reasons


# ---------------------------------------------------------------- education-sadc (000)

def test_education_sadc_grades_from_interactions() -> None:
    rs = "education-sadc"
    visit = contact(D0, "visit")
    assert grade_of(rs, [visit])[0] == "C"
    trial = contact(D0 + timedelta(days=3), "trial_class")
    assert grade_of(rs, [visit, trial])[0] == "B"
    met = contact(D0 + timedelta(days=5), "meeting", needs_known=True)
    assert grade_of(rs, [visit, trial, met])[0] == "A"
    comparing = contact(D0 + timedelta(days=6), "stage_update", stage="comparing")
    assert grade_of(rs, [visit, comparing])[0] == "A"
    negotiating = contact(D0 + timedelta(days=8), "stage_update", stage="negotiating", budget_confirmed=True)
    grade, ev = grade_of(rs, [visit, trial, met, negotiating])
    assert grade == "S"
    assert ev.reasons["intent"][0].startswith("Rule 2 (in price negotiation with budget in hand)")
    # Negotiating without a budget is A (the source: budget in hand makes S).
    assert grade_of(rs, [contact(D0, "stage_update", stage="negotiating")])[0] == "A"
    # The trial class only counts for 60 days; the visit for 180.
    assert grade_of(rs, [visit, trial], as_of=D0 + timedelta(days=62))[0] == "B"
    assert grade_of(rs, [visit, trial], as_of=D0 + timedelta(days=63))[0] == "C"
    assert grade_of(rs, [visit, trial], as_of=D0 + timedelta(days=180))[0] == "D"
    # Child too young: D, whatever happened before.
    assert grade_of(rs, [visit, trial, contact(D0 + timedelta(days=9), "stage_update", stage="no_need")])[0] == "D"


# ---------------------------------------------------------------- sales-cycle-abcde (002, 003)

@pytest.mark.parametrize(("days", "grade"), [(0, "A"), (31, "A"), (32, "B"), (92, "B"), (93, "C"), (183, "C"),
                                             (184, "D"), (-5, "A")])
def test_sales_cycle_by_expected_close(days, grade) -> None:
    close = (D0 + timedelta(days=days)).date().isoformat()
    assert grade_of("sales-cycle-abcde", [contact(D0, "stage_update", expected_close_at=close, need="clear")])[0] == grade


def test_sales_cycle_potential_and_dead() -> None:
    close = (D0 + timedelta(days=10)).date().isoformat()
    assert grade_of("sales-cycle-abcde", [contact(D0, "stage_update", expected_close_at=close, need="potential")])[0] == "D"
    assert grade_of("sales-cycle-abcde", [contact(D0, "stage_update", expected_close_at=close, need="none")])[0] == "E"
    assert grade_of("sales-cycle-abcde", [contact(D0, "call")])[0] == "D"
    # Time passes: a close date 40 days away is B today and A nine days later.
    far = (D0 + timedelta(days=40)).date().isoformat()
    events = [contact(D0, "stage_update", expected_close_at=far)]
    assert grade_of("sales-cycle-abcde", events)[0] == "B"
    assert grade_of("sales-cycle-abcde", events, as_of=D0 + timedelta(days=9))[0] == "A"


# ---------------------------------------------------------------- b2b-pipeline-abcd (002)

@pytest.mark.parametrize(("amount", "grade"), [(100000, "A"), (99999.99, "B"), (50000, "B"), (49999, "C"),
                                               (20000, "C"), (19999.99, "D")])
def test_b2b_amount_bounds(amount, grade) -> None:
    assert grade_of("b2b-pipeline-abcd", [contact(D0, "stage_update", expected_monthly_amount=amount)])[0] == grade


def test_b2b_amount_first_then_a_short_time_raises() -> None:
    def at(amount, days):
        attrs = {"expected_monthly_amount": amount}
        if days is not None:
            attrs["expected_close_at"] = (D0 + timedelta(days=days)).date().isoformat()
        return grade_of("b2b-pipeline-abcd", [contact(D0, "stage_update", **attrs)])[0]
    assert at(10000, 400) == "D"  # small and far
    assert at(10000, 60) == "A"  # small but closing within 3 months
    assert at(120000, 400) == "A"  # big, whenever
    assert at(30000, 150) == "B"  # C by amount, B by time: the better
    assert at(60000, 300) == "B"  # B by amount, C by time
    assert at(None, 300) == "C"  # no amount: time alone


# ---------------------------------------------------------------- real-estate-abcd (002)

def test_real_estate_b_plus_holds_a_queue_number_with_strong_intent() -> None:
    visit = contact(D0, "visit", probability=0.5)
    queue = contact(D0 + timedelta(days=2), "queue_number", queue_number="Q-0815", probability="70%")
    grade, ev = grade_of("real-estate-abcd", [visit, queue])
    assert grade == "B+"
    assert ev.reasons["intent"][0].startswith("Rule 2 (排号客户, holds a queue number)")
    assert any("≈70% close" in line for line in ev.reasons["intent"])


@pytest.mark.parametrize(("probability", "b", "c"), [(0.7, "B+", "C+"), (0.5, "B", "C"), (0.2, "B-", "C-"),
                                                     (None, "B", "C")])
def test_real_estate_sub_grades_from_the_sources_percentages(probability, b, c) -> None:
    attrs = {} if probability is None else {"probability": probability}
    assert grade_of("real-estate-abcd", [contact(D0, "queue_number", **attrs)])[0] == b
    assert grade_of("real-estate-abcd", [contact(D0, "visit", **attrs)])[0] == c


def test_real_estate_a_and_d() -> None:
    assert grade_of("real-estate-abcd", [contact(D0, "queue_number"), contact(D0, "deposit_paid")])[0] == "A"
    assert grade_of("real-estate-abcd", [contact(D0, "assessment", owner=True)])[0] == "A"
    assert grade_of("real-estate-abcd", [contact(D0, "visit", invalid="competitor_survey")])[0] == "D"
    assert grade_of("real-estate-abcd", [contact(D0, "call")])[0] == "D"


# ---------------------------------------------------------------- key-account-abc (001)

def test_key_account_top_5_percent_needs_the_population() -> None:
    events = [txn(D0, "purchase", "50000")]
    grade, ev = grade_of("key-account-abc", events)
    assert grade == "C"
    assert "not known yet" in " ".join(ev.reasons["value"])
    thresholds = {("purchases.net.365d", 0.95): 40000_00.0, ("purchases.net.365d", 0.8): 10000_00.0}
    assert grade_of("key-account-abc", events, population=thresholds)[0] == "A"
    assert grade_of("key-account-abc", [txn(D0, "purchase", "39999.99")], population=thresholds)[0] == "B"
    assert grade_of("key-account-abc", [txn(D0, "purchase", "9999.99")], population=thresholds)[0] == "C"
    # Nobody with no spend is key, even when most customers have none.
    zero = {("purchases.net.365d", 0.95): 0.0, ("purchases.net.365d", 0.8): 0.0}
    assert grade_of("key-account-abc", [contact(D0, "call")], population=zero)[0] == "C"


# ---------------------------------------------------------------- scorecard-abc (002, 004)

RATINGS = ("sales_rating", "strength_rating", "reach_rating", "philosophy_rating", "management_rating",
           "cooperation_rating")


def _scorecard(rating: str, years: int, pay_days: int | None) -> tuple[str, float]:
    start = D0 - timedelta(days=365 * years)
    events = [txn(start, "purchase", "100")]
    if pay_days is not None:
        events += [txn(D0 - timedelta(days=pay_days + 1), "invoice", "100", invoice_id="inv-1"),
                   txn(D0 - timedelta(days=1), "payment", "100", invoice_id="inv-1")]
    events.append(contact(D0, "assessment", **{r: rating for r in RATINGS}))
    grade, ev = grade_of("scorecard-abc", events)
    total = float(ev.reasons["quality"][-1].split("total ")[1].split(" ")[0])
    return grade, total


@pytest.mark.parametrize(("rating", "years", "pay_days", "total", "grade"), [
    ("good", 3, 45, 200, "A"),  # 8 × 25
    ("较好", 2, 75, 160, "A"),  # 8 × 20
    ("average", 3, 45, 122, "B"),  # 6 × 12 + 25 + 25
    ("average", 1, 105, 96, "C"),  # 8 × 12
    ("poor", 1, 106, 47, "ungraded"),  # 6 × 5 + 12 + 5
    ("fairly_good", 0, None, 137, "B"),  # 6 × 20 + 5 (new) + 12 (no invoice yet)
])
def test_scorecard_points_and_the_sources_bands(rating, years, pay_days, total, grade) -> None:
    assert _scorecard(rating, years, pay_days) == (grade, total)


def test_scorecard_band_edges() -> None:
    rs = preset("scorecard-abc")
    decider: Any = rs.ladders[0].decider  # the scorecard's decider (grade_for is its own)
    assert [decider.grade_for(x)[0] for x in (150, 149.99, 100, 99, 80, 79)] == ["A", "B", "B", "C", "C", "ungraded"]


# ---------------------------------------------------------------- bank-tiers (002)

def test_bank_tiers_by_last_months_average_daily_balance() -> None:
    # 100,000 yuan deposited on 1 Feb, 50,000 withdrawn on 15 Feb (2026: 28 days).
    feb1 = local("2026-02-01", 9)
    events = [txn(feb1, "deposit", "100000"), txn(local("2026-02-15", 9), "withdrawal", "50000")]
    march = local("2026-03-02")
    grade, ev = grade_of("bank-tiers", events, as_of=march)
    # 14 days at 100,000 and 14 days at 50,000: average 75,000 → gold.
    assert ev.values["balance.adb.last_month"] == 75_000_00
    assert grade == "gold"
    # In February itself, January's average is 0: ordinary.
    assert grade_of("bank-tiers", events, as_of=local("2026-02-20"))[0] == "ordinary"


@pytest.mark.parametrize(("balance", "tier"), [("1500000", "diamond"), ("1499999.99", "platinum"),
                                               ("300000", "platinum"), ("299999.99", "gold"), ("50000", "gold"),
                                               ("49999.99", "ordinary")])
def test_bank_tiers_bounds(balance, tier) -> None:
    events = [txn(local("2026-01-20"), "deposit", balance)]
    assert grade_of("bank-tiers", events, as_of=local("2026-03-01"))[0] == tier


def test_bank_tiers_income_test_instead() -> None:
    assert grade_of("bank-tiers", [contact(D0, "assessment", household_income=800000)])[0] == "platinum"
    assert grade_of("bank-tiers", [contact(D0, "assessment", household_income=199999)])[0] == "ordinary"
    assert grade_of("bank-tiers", [contact(D0, "assessment", household_income="3000000")])[0] == "diamond"


# ---------------------------------------------------------------- pharma-abc (003)

@pytest.mark.parametrize(("level", "behaviour", "points", "grade"), [
    ("3", "first_choice", 9, "A"), ("三级", "次选", 8, "A"), (3, "other", 5, "B"),
    ("2", "first_choice", 7, "A"), ("2", "second_choice", 5, "B"), ("二级", "其他", 3, "B"),
    ("1", "首选", 3, "B"), ("1", "second_choice", 2, "C"), ("一级", "other", 1, "C"),
])
def test_pharma_points_grid(level, behaviour, points, grade) -> None:
    got, ev = grade_of("pharma-abc", [contact(D0, "assessment", hospital_level=level, prescribing=behaviour)])
    assert got == grade
    assert f"= {points} point" in " ".join(ev.reasons["potential"])


def test_pharma_unassessed_is_c() -> None:
    assert grade_of("pharma-abc", [contact(D0, "visit")])[0] == "C"


# ---------------------------------------------------------------- risk-3 (000)

def test_risk_levels() -> None:
    verified = contact(D0, "assessment", identity_verified=True)
    assert grade_of("risk-3", [verified])[0] == "low"
    assert grade_of("risk-3", [contact(D0, "call")])[0] == "medium"
    for record in ("overdue", "suspicious_transaction", "violation"):
        assert grade_of("risk-3", [verified, contact(D0 + timedelta(days=1), record)])[0] == "high"
    complaint = contact(D0 + timedelta(days=1), "complaint")
    assert grade_of("risk-3", [verified, complaint])[0] == "medium"
    # Records age out after 730 days.
    events = [verified, contact(D0, "overdue")]
    assert grade_of("risk-3", events, as_of=D0 + timedelta(days=729))[0] == "high"
    assert grade_of("risk-3", events, as_of=D0 + timedelta(days=730))[0] == "low"


# ---------------------------------------------------------------- credit-days (002, 004)

@pytest.mark.parametrize(("days", "grade"), [(0, "A"), (45, "A"), (46, "B"), (75, "B"), (76, "C"), (105, "C"),
                                             (106, "D"), (255, "D"), (256, "E")])
def test_credit_days_from_the_004_table(days, grade) -> None:
    events = [txn(D0, "invoice", "1000", invoice_id="x"), txn(D0 + timedelta(days=days), "payment", "1000", invoice_id="x")]
    assert grade_of("credit-days", events)[0] == grade


def test_credit_days_an_unpaid_invoice_counts_with_its_age() -> None:
    events = [txn(D0, "invoice", "1000", invoice_id="x")]
    assert grade_of("credit-days", events)[0] == "A"
    assert grade_of("credit-days", events, as_of=D0 + timedelta(days=46))[0] == "B"
    assert grade_of("credit-days", events, as_of=D0 + timedelta(days=256))[0] == "E"
    assert grade_of("credit-days", [contact(D0, "call")])[0] == "unrated"


def test_credit_days_payment_before_its_invoice_arrives() -> None:
    events = [txn(D0 + timedelta(days=50), "payment", "1000", invoice_id="x"), txn(D0, "invoice", "1000", invoice_id="x")]
    assert grade_of("credit-days", events)[0] == "B"


# ---------------------------------------------------------------- lifecycle, loyalty (000)

def test_lifecycle() -> None:
    rs = "lifecycle"
    assert grade_of(rs, [contact(D0, "email", need="none")])[0] == "non_customer"
    assert grade_of(rs, [contact(D0, "call")])[0] == "potential"
    assert grade_of(rs, [contact(D0, "quote_requested")])[0] == "target"
    bought = [txn(D0, "purchase", "10")]
    assert grade_of(rs, bought)[0] == "actual"
    assert grade_of(rs, bought, as_of=D0 + timedelta(days=364))[0] == "actual"
    assert grade_of(rs, bought, as_of=D0 + timedelta(days=365))[0] == "churned"


def test_loyalty() -> None:
    rs = "loyalty"
    assert grade_of(rs, [contact(D0, "call")])[0] == "potential"
    assert grade_of(rs, [txn(D0, "purchase", "10")])[0] == "new"
    assert grade_of(rs, [txn(D0, "purchase", "10")], as_of=D0 + timedelta(days=179))[0] == "new"
    assert grade_of(rs, [txn(D0, "purchase", "10")], as_of=D0 + timedelta(days=180))[0] == "old"
    repeat = [txn(D0 - timedelta(days=400), "purchase", "10")] + [txn(D0 - timedelta(days=30 * i), "purchase", "10")
                                                                 for i in range(4)]
    assert grade_of(rs, repeat)[0] == "loyal"
    two = repeat[:3]
    assert grade_of(rs, two, as_of=D0)[0] == "old"
    assert grade_of(rs, two + [contact(D0, "referral")])[0] == "loyal"
