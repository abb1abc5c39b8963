"""End to end on the broker: a relative ladder (top 5% / top 20% by spend) agrees with exact quantiles."""

from __future__ import annotations

import ast
import random
import time
from collections import defaultdict

import orjson

from rules import population as pop
from rules.engine import compile_ruleset
from rules.population import RELATIVE_ACCURACY
from rules.ruleset import load
from streams.tools.local import consume
from tests.streams.producerhelp import produce_librdkafka as produce

N = 240


def purchase(event_id: str, customer: str, when: str, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({"event_id": event_id, "customer_id": customer, "occurred_at": when,
                                            "type": "purchase", "amount": amount, "currency": "CNY"})


def _exact(values: list[int], q: float) -> tuple[int, int]:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    return ordered[int(rank)], ordered[min(len(ordered) - 1, int(rank) + (rank % 1 > 0))]


def _logged_thresholds(log: str) -> dict | None:
    """The population thresholds the worker logged last (it logs them each time they change)."""
    mark = "gradeflow: population thresholds "
    at = log.rfind(mark)
    return ast.literal_eval(log[at + len(mark):].splitlines()[0]) if at >= 0 else None


def _published_thresholds(bootstrap: str, topic: str) -> dict:
    """The thresholds every partition's latest sketch on the population topic gives, merged."""
    latest = {key: value for _, key, value in consume(bootstrap, [topic], idle_s=2, timeout_s=10)}
    rs = compile_ruleset(load("key-account-abc"))
    return pop.thresholds(rs, pop.merge(pop.decode(value) for value in latest.values() if value is not None))


def test_relative_ladder_agrees_with_an_exact_offline_computation(worker_factory, bootstrap) -> None:
    worker = worker_factory(GRADEFLOW_RULESET="key-account-abc", GRADEFLOW_POPULATION_INTERVAL_S="2")
    env = worker.env
    rnd = random.Random(4)
    spend = {f"k{i:03d}": rnd.randrange(100, 2_000_000) for i in range(N)}  # minor units
    changes_topic = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]

    # Phase 1: one purchase each. The population is unknown yet: everyone starts at C.
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
            [purchase(f"p-{c}", c, "2026-05-01T10:00:00+08:00", f"{v / 100:.2f}") for c, v in spend.items()])
    first = list(consume(bootstrap, [changes_topic], until=N, idle_s=30, timeout_s=120))
    assert len(first) == N and {orjson.loads(v)["grade"] for _, _, v in first} == {"C"}, worker.tail()

    # The worker publishes one sketch per partition it owns; wait for them and for it to read them back.
    population = f"{env['GRADEFLOW_APP_ID']}-population"
    deadline = time.monotonic() + 60
    keys: set[bytes | None] = set()
    while time.monotonic() < deadline and len(keys) < 4:
        keys = {k for _, k, _ in consume(bootstrap, [population], idle_s=2, timeout_s=10)}
    assert keys == {f"key-account-abc@1/{p}".encode() for p in range(4)}, worker.tail()
    # ... and until the worker grades with the thresholds of all of them merged.
    assert worker.log_path is not None
    published = _published_thresholds(bootstrap, population)
    assert published, "the published sketches give no thresholds"
    deadline = time.monotonic() + 60
    while _logged_thresholds(worker.log_path.read_text(errors="replace")) != published:
        assert time.monotonic() < deadline, f"the worker never graded with {published}:\n{worker.tail()}"
        time.sleep(0.2)

    # Phase 2: one more cent each; every customer is re-graded against the merged population.
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
            [purchase(f"q-{c}", c, "2026-05-02T10:00:00+08:00", "0.01") for c in spend])
    got = list(consume(bootstrap, [changes_topic], idle_s=8, timeout_s=120))
    grade = defaultdict(lambda: "C")
    for _, _, raw in got:
        doc = orjson.loads(raw)
        grade[doc["customer_id"]] = doc["grade"]

    t95, t80 = _exact(list(spend.values()), 0.95), _exact(list(spend.values()), 0.80)
    near = 0
    for customer, value in spend.items():
        want = "A" if value >= t95[1] else "B" if value >= t80[1] else "C"
        if grade[customer] != want:
            # Only a customer within the sketch's stated relative error of a threshold may differ.
            assert any(abs(value + 1 - t) <= RELATIVE_ACCURACY * t for t in (*t95, *t80)), (customer, value, grade[customer], want)
            near += 1
    assert sum(1 for g in grade.values() if g == "A") >= 0.04 * N
    assert near <= 0.05 * N
