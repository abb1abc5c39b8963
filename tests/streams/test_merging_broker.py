"""Identity merges on a real broker: one worker over four partitions, two customers on different
partitions merged while the worker is killed (SIGKILL) at a random point of the merge, then
restarted. The merged customer's grades and metrics (read from the worker's API) equal those of
one customer fed the union of both ids' events offline; the merged-away id ended with the
terminal change on every ladder; a later event of it is graded as the merged customer's; the command
refuses a merge of an id already merged or never seen; `gradeflow audit` agrees with everything; erasing a
merged customer erases the id merged into it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from functools import partial
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import load
from rules.merge import ENDED, TERMINAL_GRADE
from streams.downstream.web import table_grades
from streams.processor import TRANSACTIONS, Record, process_batch
from streams.settings import erasure_topics, load_settings
from streams.tools.erase import request_erasures, wait_receipts
from streams.tools.local import ROOT, free_port, produce, unique_env
from streams.tools.merge import request_merge, wait_outcome
from streams.tools.replay import wait_graded
from tests.streams.downstream_helpers import wait_until
from tests.streams.partitionhelp import customers_on
from tests.streams.test_erasure_broker import read_all

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

KEY = "merge-test-erasure-key-" + "0123456789abcdef" * 2
START = datetime(2026, 1, 5, 9, 0, tzinfo=timezone(timedelta(hours=8)))


def history(customer: str, n: int, seed: int, tag: str) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    when = START + timedelta(hours=rng.randrange(48))
    out = []
    for i in range(n):
        when += timedelta(days=rng.choice([0, 1, 3, 10]), minutes=rng.randrange(600))
        doc = {"event_id": f"{tag}{i}", "customer_id": customer, "occurred_at": when.isoformat(),
               "type": rng.choice(["purchase", "purchase", "refund"]),
               "amount": f"{rng.choice([80, 500, 2500, 9000, 30000]):.2f}", "currency": "CNY"}
        out.append((customer.encode(), orjson.dumps(doc)))
    return out


def union_grades(rs: Any, into: str, events: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """What the API shows for one customer ``into`` fed ``events`` (of any id), graded offline."""
    docs = sorted((orjson.loads(v) for _k, v in events), key=lambda d: d["occurred_at"])
    store: dict[str, bytes] = {}
    now = datetime.now(timezone.utc)
    for n, doc in enumerate(docs):
        doc["customer_id"] = into
        record = Record(TRANSACTIONS, "t", 0, n, into.encode(), orjson.dumps(doc))
        result = process_batch([record], rs, store, now)
        for customer_id, (raw, _r) in result.states.items():
            store[customer_id] = raw
    return table_grades(store[into], rs)


def api(port: int, customer: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/customers/{customer}", timeout=5) as answer:
            return orjson.loads(answer.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def status(port: int, customer: str) -> int:
    """The HTTP status of the API's answer for ``customer``."""
    import urllib.error

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/customers/{customer}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


class Watcher:
    """Follows the merge topic from its end now, to kill the worker right after a chosen step."""

    def __init__(self, settings: Any) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.kafka_config import kafka_python_options
        from streams.settings import merges_topic

        self.consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
        tps = [TopicPartition(merges_topic(settings), p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        for tp, end in self.consumer.end_offsets(tps).items():
            self.consumer.seek(tp, end)

    def wait(self, merge_id: str, step: str, partition: int | None, timeout_s: float) -> bool:
        """Whether the step ``step`` of ``merge_id`` (on ``partition``, if given) came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for tp, records in self.consumer.poll(timeout_ms=5).items():
                    for r in records:
                        doc = orjson.loads(r.value)
                        if doc["merge_id"] == merge_id and doc["step"] == step and partition in (None, tp.partition):
                            return True
            return False
        finally:
            self.consumer.close()


def shows(port: int, customer: str, grades: dict[str, Any]) -> dict[str, Any] | None:
    """The API's answer for ``customer`` once it shows ``grades``, else None."""
    answer = api(port, customer)
    return answer if answer is not None and answer["grades"] == grades else None


def test_a_merge_survives_a_crash_at_a_random_point_and_equals_the_union(worker_factory: Any) -> None:
    env = unique_env("merge", GRADEFLOW_CUSTOMER_MERGES="true", GRADEFLOW_PARTITIONS="4", GRADEFLOW_ERASURE_KEY=KEY,
                     GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()})
    rs = compile_ruleset(load(settings.ruleset))
    topics = settings.topics
    port = free_port()
    worker_env = {**env, "GRADEFLOW_WEB_PORT": str(port)}
    rng = random.Random()
    seed = rng.randrange(1_000_000)
    rng = random.Random(seed)
    # Two pairs, each on two different partitions (the producer's partitioner: murmur2).
    pairs = [(customers_on(0, 1, prefix="into-a")[0], customers_on(3, 1, prefix="from-a")[0]),
             (customers_on(2, 1, prefix="into-b")[0], customers_on(1, 1, prefix="from-b")[0])]
    others = [f"other-{i}" for i in range(8)]
    events: dict[str, list[tuple[bytes, bytes]]] = {}
    for i, customer in enumerate([c for pair in pairs for c in pair] + others):
        events[customer] = history(customer, 12, seed + i, f"{customer}-")
    worker = worker_factory(env=worker_env, name="worker")
    produce(settings.kafka_bootstrap, topics.transactions, [e for evs in events.values() for e in evs])
    assert wait_graded(settings, 90, progress=False)

    for n, (into, from_) in enumerate(pairs):
        # The crash point: just after one of the merge's steps is on the broker, at random.
        step = rng.choice(["find", "find", "hand_off", "transfer"])
        watcher = Watcher(settings)
        merge_id, start = request_merge(settings, from_, into)
        seen = watcher.wait(merge_id, step, rng.randrange(settings.partitions) if step == "find" else None, 60)
        time.sleep(rng.uniform(0.0, 0.02))  # and a little later, at times
        worker.kill()
        assert seen, (seed, step)
        worker = worker_factory(env=worker_env, name=f"worker-again-{n}")
        outcome = wait_outcome(settings, merge_id, start, 120)
        assert outcome is not None and outcome["step"] == "done", (seed, outcome)

    # A later event of each merged-away id, on its own partition: graded as the survivor's.
    later = {from_: history(from_, 1, seed + 100 + n, f"{from_}-later-") for n, (_into, from_) in enumerate(pairs)}
    produce(settings.kafka_bootstrap, topics.transactions, [e for evs in later.values() for e in evs])
    assert wait_graded(settings, 90, progress=False)
    for into, from_ in pairs:
        union = events[into] + events[from_] + later[from_]
        want = union_grades(rs, into, union)
        shown = wait_until(partial(shows, port, into, want), 90,
                           what=f"{into}'s grades from the union of both ids' events (seed {seed})")
        assert shown["source"] == "table"

    changes = [orjson.loads(r.value) for r in read_all(settings, topics.grade_changes) if r.value is not None]
    for _into, from_ in pairs:
        theirs = [c for c in changes if c["customer_id"] == from_]
        last = {c["ladder"]: c for c in theirs}
        assert last and all(c["grade"] == TERMINAL_GRADE and c["direction"] == ENDED
                            and c["cause"]["kind"] == "merge" for c in last.values()), (seed, last)
        first_end = next(i for i, c in enumerate(theirs) if c["direction"] == ENDED)
        assert all(c["direction"] == ENDED for c in theirs[first_end:]), seed  # copies at most, after it
    # The command: merging an id already merged, or one never seen, is refused, and says why.
    for from_, into, why in [(pairs[0][1], pairs[0][0], "already merged"), ("nobody", pairs[1][0], "no state held")]:
        cli = subprocess.run([sys.executable, "-m", "streams.tools.cli", "customers", "merge", from_, into, "--wait",
                              "--timeout", "60"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=90)
        assert cli.returncode == 1 and why in cli.stderr, cli.stderr

    # Others untouched: their grades those of their own events.
    for customer in others:
        want = union_grades(rs, customer, events[customer])
        got = api(port, customer)
        assert got is not None and got["grades"] == want, customer

    # The audit recomputes everything offline and agrees, merged customers included.
    audit = subprocess.run([sys.executable, "-m", "streams.tools.cli", "audit"], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0 and "merged         4 customer ids" in audit.stdout, audit.stdout + audit.stderr

    # Erasing a merged customer erases the id merged into it: a receipt for each, no state left.
    into, from_ = pairs[0]
    ids, receipts_from = request_erasures(settings, [into])
    assert set(wait_receipts(settings, set(ids), receipts_from, 90)) == set(ids)
    receipts = wait_until(lambda: {orjson.loads(r.value)["customer_id"] for r in
                                   read_all(settings, erasure_topics(settings).receipts)} >= {into, from_}, 60,
                          what="a receipt for the merged-away id too")
    assert receipts
    assert status(port, into) == status(port, from_) == 404  # nothing held, in the table or Redis
