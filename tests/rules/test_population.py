"""The population sketch (rules/population.py): its stated error bound, merging, bytes, and grading with it."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import timedelta

import pytest

from rules import population as pop
from rules.engine import evaluate
from tests.rules.presethelp import local, preset, state_of, txn

ALPHA = pop.RELATIVE_ACCURACY


def _exact_candidates(values: Sequence[float], q: float) -> tuple[float, float]:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    return ordered[math.floor(rank)], ordered[math.ceil(rank)]


def _within(estimate: float | None, exact: tuple[float, float]) -> bool:
    assert estimate is not None, "the sketch has no values"
    return any(abs(estimate - x) <= ALPHA * abs(x) + 1e-9 for x in exact)


DISTRIBUTIONS = {
    "lognormal spend": lambda r: round(r.lognormvariate(9, 2)),
    "small counts": lambda r: r.randrange(0, 30),
    "with refunds below zero": lambda r: r.randrange(-50_000, 2_000_000),
    "heavy ties": lambda r: r.choice([0, 100, 100, 100, 5000]),
}


@pytest.mark.parametrize("shape", sorted(DISTRIBUTIONS))
def test_quantiles_are_within_the_stated_relative_accuracy(shape) -> None:
    rnd = random.Random(shape)
    values = [DISTRIBUTIONS[shape](rnd) for _ in range(20_000)]
    sketch = pop.Sketch()
    for v in values:
        sketch.add(v)
    assert sketch.count == len(values)
    for q in (0.01, 0.05, 0.25, 0.5, 0.8, 0.95, 0.99):
        assert _within(sketch.quantile(q), _exact_candidates(values, q)), (q, sketch.quantile(q))


def test_merged_partition_sketches_equal_one_sketch_of_everything_and_survive_bytes() -> None:
    rnd = random.Random(3)
    values = [round(rnd.lognormvariate(8, 1.5)) for _ in range(10_000)]
    whole = pop.Sketch()
    parts = [pop.Sketch() for _ in range(4)]
    for i, v in enumerate(values):
        whole.add(v)
        parts[i % 4].add(v)
    merged = pop.merge([{"m": pop.Sketch.from_bytes(p.to_bytes())} for p in parts])["m"]
    for q in (0.05, 0.5, 0.95):
        assert merged.quantile(q) == pytest.approx(whole.quantile(q), rel=1e-12)
        assert _within(merged.quantile(q), _exact_candidates(values, q))
    assert len(whole.to_bytes()) < 8_000
    assert pop.Sketch().quantile(0.5) is None


def test_relative_grades_agree_with_exact_quantiles_outside_the_error_band() -> None:
    rs = preset("key-account-abc")
    d0 = local("2026-03-01")
    rnd = random.Random(11)
    amounts = [rnd.randrange(1, 5_000_000) for _ in range(600)]
    states = {f"c{i}": state_of(rs, [txn(d0 - timedelta(days=rnd.randrange(0, 300)), "purchase", f"{a / 100:.2f}",
                                         customer=f"c{i}")]) for i, a in enumerate(amounts)}
    # Four partitions, merged as the workers do.
    parts = [pop.build(rs, [s for i, s in enumerate(states.values()) if i % 4 == k], d0) for k in range(4)]
    thresholds = pop.thresholds(rs, pop.merge(pop.decode(pop.encode(p)) for p in parts))
    assert set(thresholds) == {("purchases.net.365d", 0.8), ("purchases.net.365d", 0.95)}
    exact95 = _exact_candidates(amounts, 0.95)
    exact80 = _exact_candidates(amounts, 0.8)
    disagreements = 0
    for (cid, state), amount in zip(states.items(), amounts):
        got = evaluate(rs, state, d0, thresholds).grades["value"]
        want = "A" if amount >= exact95[1] else "B" if amount >= exact80[1] else "C"
        near = any(abs(amount - t) <= ALPHA * t for t in (*exact95, *exact80))
        if got != want:
            disagreements += 1
            assert near, (cid, amount, got, want)
    # The band is narrow: few customers sit in it.
    assert disagreements <= 0.05 * len(amounts)
