"""A long replay on a real broker, checked by ``gradeflow audit``'s own checker.

A generated history of more than a year (``EVENTS`` transactions of ``CUSTOMERS`` customers, event
clock, four partitions) is produced by librdkafka (confluent-kafka's default partitioner, not
Kafka's Java one) as fast as it goes, faster than a worker grades it. Each run then reads every
topic back and requires every chain valid, every key downgrade with exactly one alert, and the
published changes equal, customer by customer, to the offline run of the same records:

- without faults;
- with the worker killed (SIGKILL) at a random point of the backlog and restarted, on several seeds;
- with a second worker joining mid-stream and leaving again.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.tools.audit import Audit, read_cluster
from streams.tools.local import ROOT, WorkerProcess, free_port, unique_env
from streams.settings import load_settings
from streams.topics import create_topics

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(900)]

CUSTOMERS = 10_000
EVENTS = 50_000
TZ = timezone(timedelta(hours=8))
RS = compile_ruleset(load("rfm-5"))


def history(seed: int = 11) -> list[tuple[bytes, bytes]]:
    """EVENTS (key, value) transactions over ~14 months; some late (inside the lateness), some refunds."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, 8, tzinfo=TZ)
    span_s = 430 * 86400
    out = []
    for n in range(EVENTS):
        customer = f"cust-{rng.randrange(CUSTOMERS):05d}"
        when = start + timedelta(seconds=span_s * n / EVENTS)
        if rng.random() < 0.05:
            when -= timedelta(days=rng.choice([1, 3, 20]))
        refund = rng.random() < 0.08
        doc = {"event_id": f"e{n}", "customer_id": customer, "occurred_at": when.isoformat(),
               "type": "refund" if refund else "purchase",
               "amount": f"{rng.choice([80, 500, 2500, 9000, 30000]) * (0.5 if refund else 1):.2f}",
               "currency": "CNY"}
        out.append((customer.encode(), orjson.dumps(doc)))
    return out


@pytest.fixture(scope="module")
def records() -> list[tuple[bytes, bytes]]:
    return history()


class Run:
    def __init__(self, bootstrap: str, tag: str) -> None:
        self.env = unique_env(f"replay-{tag}", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_PARTITIONS="4",
                              GRADEFLOW_CLOCK="event", GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10",
                              GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1", GRADEFLOW_DOWNSTREAM="false")
        self.settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in self.env.items()})
        create_topics(self.settings)
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, name: str) -> WorkerProcess:
        env = {**self.env, "GRADEFLOW_DATA_DIR": f"{self.env['GRADEFLOW_DATA_DIR']}-{name}",
               "GRADEFLOW_WEB_PORT": str(free_port())}
        worker = self.workers[name] = WorkerProcess(env, name=name)
        return worker.start(ready_timeout=120)

    def produce(self, records: list[tuple[bytes, bytes]]) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "linger.ms": 20,
                             "enable.idempotence": True})
        topic = self.settings.topics.transactions
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, value=value, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        assert producer.flush(60) == 0

    def committed(self) -> int:
        """Input records whose offsets the group committed."""
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            offsets = admin.list_consumer_group_offsets(self.settings.group_id)
        finally:
            admin.close()
        return sum(meta.offset for tp, meta in offsets.items()
                   if tp.topic == self.settings.topics.transactions and meta.offset > 0)

    def wait_committed(self, count: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.committed() < count:
            assert time.monotonic() < deadline, f"committed {self.committed()} of {count}\n{self.logs()}"
            time.sleep(0.5)

    def audit(self, timeout_s: float = 120.0):
        """The audit once the clock has caught up: repeated until it agrees or time runs out."""
        audit = Audit(RS, clock="event")
        deadline = time.monotonic() + timeout_s
        while True:
            inputs, changes, alerts = read_cluster(self.settings)
            report = audit.check(inputs, changes, alerts)
            if report.ok or time.monotonic() > deadline:
                return report
            time.sleep(2)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{w.tail(15)}" for n, w in self.workers.items())

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def check(run: Run, report) -> None:
    assert report.ok, report.render() + "\n" + run.logs()
    assert report.agreeing_customers == report.customers >= CUSTOMERS * 0.95
    assert report.changes > EVENTS // 5 and report.alerts > 100


def test_long_replay_without_faults(bootstrap, records) -> None:
    run = Run(bootstrap, "plain")
    try:
        run.start("w1")
        run.produce(records)
        run.wait_committed(EVENTS)
        check(run, run.audit())
        # The same checker as the command users run: 100% and exit 0.
        done = subprocess.run([sys.executable, "-m", "streams.tools.cli", "audit", "--progress"], cwd=ROOT,
                              env={**os.environ, **run.env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "customers agreeing" in done.stdout and "(100.00%)" in done.stdout and "OK: every check agrees" in done.stdout
        assert "audit" in done.stderr  # the progress bar
    finally:
        run.stop()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_replay_with_the_worker_killed_at_a_random_point(bootstrap, records, seed) -> None:
    run = Run(bootstrap, f"kill{seed}")
    try:
        run.start("w1")
        run.produce(records)
        run.wait_committed(int(EVENTS * random.Random(seed).uniform(0.1, 0.8)))
        run.workers["w1"].kill()  # SIGKILL mid-backlog: nothing flushed, nothing committed on the way out
        run.start("w1")
        run.wait_committed(EVENTS)
        check(run, run.audit())
    finally:
        run.stop()


def test_long_replay_with_a_second_worker_joining_and_leaving(bootstrap, records) -> None:
    run = Run(bootstrap, "join")
    try:
        run.start("w1")
        run.produce(records)
        run.wait_committed(EVENTS // 4)
        run.start("w2")  # rebalance: two partitions and their tables move to w2
        run.wait_committed(EVENTS // 2)
        run.workers["w2"].stop()  # and back to w1
        run.wait_committed(EVENTS)
        check(run, run.audit())
    finally:
        run.stop()
