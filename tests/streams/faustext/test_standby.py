"""Standby replicas (GRADEFLOW_STANDBY_REPLICAS, Faust's table_standby_replicas) on the real broker.

Two workers in one group, each holding a standby copy of the other's table partitions; customers
are graded, one worker is killed (SIGKILL, a crash; a 6 s session timeout, the broker's minimum,
keeps the wait short), and the survivor grades new events of the customers it took over from
their previous state: no "initial" change, the previous grade is the one the dead worker emitted,
the metrics count both purchases.

Standbys need the RocksDB store (the settings refuse them with the memory store, which drops
standby copies after each rebalance). A standby also buys time: the store records how far the
changelog holds its data (streams/faustext/tables.py), so the promoted standby reads only the tail
(docs/deploy.md, "Recovery time").
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from streams.tools.local import (WorkerProcess, consume, faust_log_tables, free_port, kafka_options, produce,
                                 unique_env, wait_group)
from tests.streams.partitionhelp import partition_of

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(240)]

CUSTOMERS = 240
PARTITIONS = 4
SESSION_TIMEOUT_S = 6  # the broker's group.min.session.timeout.ms


def purchase(customer: str, event_id: str, day: int, amount: str) -> tuple[bytes, bytes]:
    """A purchase keyed by customer, on 2026-01-<day>."""
    return customer.encode(), orjson.dumps({
        "event_id": event_id, "customer_id": customer, "occurred_at": f"2026-01-{day:02d}T10:00:00+08:00",
        "type": "purchase", "amount": amount, "currency": "CNY"})


@dataclass
class Failover:
    """What the scenario saw: the group before the crash, every grade change, the survivor's log."""

    env: dict[str, str]
    assignment: dict[str, dict[str, set[int]]]  # client id → topic → partitions, before the kill
    killed_partitions: set[int]
    initial: dict[str, dict]  # customer → their first grade change
    probes: dict[str, str]  # customer on a killed worker's partition → probe event id
    changes: list[dict]
    killed_at: float  # wall time
    survivor_log: str


def standby_positions(port: int) -> dict[tuple[str, int], int]:
    """``gradeflow_standby_position`` of the worker serving /metrics on ``port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    positions = {}
    for labels, value in re.findall(r"^gradeflow_standby_position\{([^}]*)\} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        positions[(found["topic"], int(found["partition"]))] = int(float(value))
    return positions


def wait_standby_warm(bootstrap: str, worker: WorkerProcess, changelog: str, partitions: set[int],
                      timeout_s: float = 60.0) -> None:
    """Until ``worker``'s standby copies of ``partitions`` have read their changelog to its end."""
    consumer = KafkaConsumer(**kafka_options(bootstrap))
    try:
        tps = [TopicPartition(changelog, p) for p in partitions]
        ends = {(tp.topic, tp.partition): end for tp, end in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
    port = int(worker.env["GRADEFLOW_WEB_PORT"])
    deadline = time.monotonic() + timeout_s
    while True:
        positions = standby_positions(port)
        if all(positions.get(tp, -1) >= end for tp, end in ends.items()):
            return
        assert time.monotonic() < deadline, f"standbys not warm: positions {positions}, ends {ends}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def failover(bootstrap: str) -> Failover:
    env = unique_env("standby", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_STANDBY_REPLICAS="1",
                     GRADEFLOW_STORE="rocksdb://",
                     GRADEFLOW_KAFKA_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
                     GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1",
                     GRADEFLOW_PARTITIONS=str(PARTITIONS))
    # Own client ids tell the workers apart in the group; own data dirs, as on two hosts.
    w1 = WorkerProcess({**env, "GRADEFLOW_KAFKA_CLIENT_ID": "w1", "GRADEFLOW_WEB_PORT": str(free_port()),
                        "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + "-w1"}, name="w1")
    w2 = WorkerProcess({**env, "GRADEFLOW_KAFKA_CLIENT_ID": "w2",
                        "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + "-w2"}, name="w2")
    transactions, changes_topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"], env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
    try:
        w1.start()
        w2.start()
        assignment = wait_group(bootstrap, env["GRADEFLOW_APP_ID"], 2, transactions)
        customers = [f"cust-{i:04d}" for i in range(CUSTOMERS)]
        produce(bootstrap, transactions, (purchase(c, f"first-{c}", 1, "100") for c in customers))
        first = [orjson.loads(v) for _t, _k, v in consume(bootstrap, [changes_topic], until=CUSTOMERS,
                                                            idle_s=30, timeout_s=90)]
        initial = {d["customer_id"]: d for d in first}
        assert len(initial) == CUSTOMERS, f"graded {len(initial)} of {CUSTOMERS}:\n{w1.tail()}\n{w2.tail()}"
        killed_partitions = assignment["w2"][transactions]
        changelog = f"{env['GRADEFLOW_APP_ID']}-customer-state-changelog"
        wait_standby_warm(bootstrap, w1, changelog, killed_partitions)

        probes = {c: f"probe-{c}" for c in customers
                  if partition_of(c.encode(), PARTITIONS) in killed_partitions}
        killed_at = time.time()
        w2.kill()
        produce(bootstrap, transactions, (purchase(c, e, 2, "50000") for c, e in probes.items()))
        changes = [orjson.loads(v) for _t, _k, v in consume(bootstrap, [changes_topic],
                                                             until=CUSTOMERS + len(probes),
                                                             idle_s=60, timeout_s=120)]
        assert w1.proc is not None and w1.proc.poll() is None, w1.tail()
        return Failover(env, assignment, killed_partitions, initial, probes, changes, killed_at,
                        w1.log_path.read_text(errors="replace") if w1.log_path else "")
    finally:
        w2.stop()
        w1.stop()


def test_each_worker_keeps_a_standby_of_the_other_workers_partitions(failover: Failover) -> None:
    env = failover.env
    transactions = env["GRADEFLOW_TOPIC_TRANSACTIONS"]
    changelog = f"{env['GRADEFLOW_APP_ID']}-customer-state-changelog"
    a = failover.assignment
    assert set(a) == {"w1", "w2"}
    assert a["w1"][transactions] | a["w2"][transactions] == set(range(PARTITIONS))
    assert not a["w1"][transactions] & a["w2"][transactions]
    # Faust gives a worker the changelog partitions of its own input partitions and of its standbys:
    # with one standby replica and two workers, each follows every changelog partition.
    for me, other in (("w1", "w2"), ("w2", "w1")):
        assert a[me][changelog] >= a[me][transactions] | a[other][transactions], a


def test_the_survivor_grades_the_customers_it_took_over_from_their_previous_state(failover: Failover) -> None:
    assert failover.probes, "no customer on the killed worker's partitions"
    by_cause: dict[str, list[dict[str, Any]]] = {}
    for doc in failover.changes:
        by_cause.setdefault(doc["cause"]["event_id"], []).append(doc)
    for customer, event_id in failover.probes.items():
        found = by_cause.get(event_id)
        assert found, f"no grade change for the probe of {customer}"
        # A repeat after the crash carries the same event_id; all copies must agree.
        assert len({d["event_id"] for d in found}) == 1, found
        doc = found[0]
        before = failover.initial[customer]
        assert before["direction"] == "initial" and before["grade"] == "B"
        # Lost state would read as a new customer: an "initial" change from one purchase of 50,000.
        assert doc["direction"] == "upgrade" and doc["previous_grade"] == before["grade"] and doc["grade"] == "A"
        assert doc["metrics"]["frequency"] == 2 and doc["metrics"]["monetary"] == "50100.00"
    # Customers on the survivor's own partitions got no probe and changed no grade.
    assert {d["customer_id"] for d in failover.changes if d["direction"] != "initial"} == set(failover.probes)


def test_the_promoted_standby_resumes_its_changelog_where_it_was(failover: Failover) -> None:
    changelog = f"{failover.env['GRADEFLOW_APP_ID']}-customer-state-changelog"
    after = [rows for stamp, rows in faust_log_tables(failover.survivor_log, "Reading Starts At - Active")
             if stamp >= failover.killed_at - 1]  # log stamps have ms; one second of slack
    highwaters = [rows for stamp, rows in faust_log_tables(failover.survivor_log, "Highwater - Active")
                  if stamp >= failover.killed_at - 1]
    assert after and highwaters, "the survivor logged no recovery after the kill"
    for p in failover.killed_partitions:
        assert highwaters[0][(changelog, p)] > 0  # the partition has state to take over
        # -1: read from the beginning; a warm standby would start near the highwater.
        assert after[0][(changelog, p)] > -1, (p, after[0], highwaters[0])
