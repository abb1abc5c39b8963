"""Scale-out with faults on a three-broker cluster made by `deploy/local/up --brokers 3`.

Topics with replication factor 3 and min.insync.replicas 2, producers with acks=all. Two
workers grade a stream; a broker is killed mid-stream and restarted; a third worker joins and
one worker is killed. Every customer's grade changes (deduplicated by event id: at-least-once
delivery may repeat one after a crash, never lose one) equal an offline run of the same events
through :func:`streams.processor.process_batch`, the code the worker runs.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from kafka import KafkaProducer

from streams.tools.local import WorkerProcess, consume, free_port, kafka_options, unique_env
from streams.settings import load_settings
from streams.stopping import EXIT_STOP_DEADLINE
from streams.topics import check_topics, create_topics
from tests.deploy.localcluster import LocalCluster, port_from_env
from tests.faults.faulthelp import Offline
from tests.streams.downstream_helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(400)]  # its own cluster (deploy/local/up)
PORT = port_from_env("GRADEFLOW_TEST_CLUSTER_PORT", 4)  # free ports of this run unless set
CUSTOMERS = 120
EVENTS = 2400


def history(seed: int = 7) -> list[tuple[bytes, bytes]]:
    """EVENTS transactions for CUSTOMERS customers, each customer's in event-time order, interleaved."""
    rng = random.Random(seed)
    clock = {f"cust-{i:03d}": datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=8))) for i in range(CUSTOMERS)}
    out = []
    for n in range(EVENTS):
        customer = rng.choice(sorted(clock))
        clock[customer] += timedelta(days=rng.choice([0, 1, 2, 5, 20, 45, 90, 150]), minutes=rng.randrange(600))
        refund = rng.random() < 0.12
        amount = f"{rng.choice([80, 500, 2500, 9000, 30000]) * (0.5 if refund else 1):.2f}"
        doc = {"event_id": f"e{n}", "customer_id": customer, "occurred_at": clock[customer].isoformat(),
               "type": "refund" if refund else "purchase", "amount": amount, "currency": "CNY"}
        out.append((customer.encode(), orjson.dumps(doc)))
    return out


def summary(doc: dict) -> tuple:
    return (doc["previous_grade"], doc["grade"], doc["direction"], doc["cause"]["event_id"], doc["metrics"]["code"])


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(PORT, brokers=3) as c:
        yield c


def test_up_prints_the_bootstrap_list_and_ps_lists_every_server(cluster):
    assert cluster.env["GRADEFLOW_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{PORT},127.0.0.1:{PORT + 1},127.0.0.1:{PORT + 2}"
    servers = cluster.ps()
    assert servers.keys() == {"controller-1", "kafka-1", "kafka-2", "kafka-3"}
    assert servers["kafka-3"][1] == f"127.0.0.1:{PORT + 2}" and servers["controller-1"][1] == f"127.0.0.1:{PORT + 3}"


def test_workers_and_brokers_fail_and_every_grade_change_arrives(cluster):
    bootstrap = cluster.env["GRADEFLOW_KAFKA_BOOTSTRAP"]
    env = unique_env("cluster", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_REPLICATION_FACTOR="3",
                     GRADEFLOW_MIN_INSYNC_REPLICAS="2", GRADEFLOW_PARTITIONS="6",
                     GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1",
                     GRADEFLOW_BATCH_SIZE="200")
    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()})
    create_topics(settings)
    assert check_topics(settings) == []
    records = history()
    expected = Offline(records, summarize=summary).changes
    assert sum(len(v) for v in expected.values()) > CUSTOMERS  # upgrades and downgrades, not only initials

    workers: list[WorkerProcess] = []

    def start_worker(name: str) -> WorkerProcess:
        w = WorkerProcess({**env, "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + "-" + name}, name=name)
        workers.append(w)
        return w.start(ready_timeout=120)

    produced = threading.Event()
    acked = [0]  # records the brokers have acknowledged so far (flushed)
    failure: list[BaseException] = []

    def produce_slowly() -> None:
        try:
            p = KafkaProducer(**kafka_options(bootstrap, env), acks="all", enable_idempotence=True,
                              max_in_flight_requests_per_connection=1, retries=20, linger_ms=5,
                              request_timeout_ms=15000, retry_backoff_ms=200)
            topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"]
            for i, (key, value) in enumerate(records):
                p.send(topic, key=key, value=value)
                if i % 40 == 39:
                    p.flush()
                    acked[0] = i + 1
                    time.sleep(0.25)  # ~30 s of stream
            p.flush()
            acked[0] = len(records)
            p.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        finally:
            produced.set()

    try:
        start_worker("w1")
        start_worker("w2")
        producer = threading.Thread(target=produce_slowly, daemon=True)
        producer.start()
        wait_until(lambda: acked[0] >= len(records) // 6 or failure, timeout=60, what="a sixth of the stream acked")
        cluster.kill("kafka-2")  # mid-stream: RF 3, min.insync 2 → writes go on
        down_at = acked[0]
        wait_until(lambda: acked[0] >= down_at + len(records) // 6 or failure, timeout=60,
                   what="another sixth acked with kafka-2 down")
        cluster.up()  # restarts kafka-2 only
        assert set(cluster.ps()) == {"controller-1", "kafka-1", "kafka-2", "kafka-3"}
        start_worker("w3")
        workers[0].kill()  # w1 crashes; w2 and w3 take its partitions after the session timeout
        assert produced.wait(180), "producer did not finish"
        assert not failure, failure

        # Wait until every customer's changes are in, then compare exactly.
        topic = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
        deadline = time.monotonic() + 120
        while True:
            got: dict[str, dict[str, tuple]] = {}
            for _t, _k, value in consume(bootstrap, [topic], idle_s=3, timeout_s=60, env=env):
                doc = orjson.loads(value)
                got.setdefault(doc["customer_id"], {})[doc["event_id"]] = summary(doc)
            seen = {c: list(v.values()) for c, v in got.items()}
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(2)
        differ = sorted(c for c in set(expected) | set(seen) if seen.get(c) != expected.get(c))
        lost = sum(len([x for x in expected.get(c, []) if x not in seen.get(c, [])]) for c in differ)
        extra = sum(len([x for x in seen.get(c, []) if x not in expected.get(c, [])]) for c in differ)
        examples = "\n".join(f"  {c}: offline {expected.get(c)}\n  {' ' * len(c)}  online  {seen.get(c)}"
                             for c in differ[:3])
        assert not differ, (f"{len(differ)} of {len(expected)} customers differ: {lost} changes lost, "
                            f"{extra} unexpected\n{examples}\n" + "\n".join(w.tail(25) for w in workers))
    finally:
        for w in workers:
            w.stop()


def test_sigterm_stops_workers_within_20_s_with_a_broker_down_and_nothing_acknowledged_is_lost(cluster):
    """Replication factor 1 on three brokers, one broker killed (its partitions have no leader) and
    Redis unreachable from the start: both workers stop within 20 s of SIGTERM, and once the broker
    is back a new worker delivers every grade change the offline run gives."""
    cluster.up()  # every broker, whatever an earlier test left down
    bootstrap = cluster.env["GRADEFLOW_KAFKA_BOOTSTRAP"]
    env = unique_env("brokerdown", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_REPLICATION_FACTOR="1",
                     GRADEFLOW_PARTITIONS="6", GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10",
                     GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1", GRADEFLOW_BATCH_SIZE="200",
                     GRADEFLOW_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    create_topics(load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()}))
    records = history(seed=11)
    expected = Offline(records, summarize=summary).changes
    workers = [WorkerProcess({**env, "GRADEFLOW_DATA_DIR": f"{env['GRADEFLOW_DATA_DIR']}-{name}",
                              "GRADEFLOW_WEB_PORT": str(free_port())}, name=name) for name in ("w1", "w2")]
    try:
        for w in workers:
            w.start(ready_timeout=120)
        p = KafkaProducer(**kafka_options(bootstrap, env), acks="all", linger_ms=5)
        for key, value in records:
            p.send(env["GRADEFLOW_TOPIC_TRANSACTIONS"], key=key, value=value)
        p.flush()
        p.close()
        topic = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
        wait_until(lambda: any(True for _ in consume(bootstrap, [topic], until=1, idle_s=2, timeout_s=5, env=env)),
                   timeout=60, what="grading under way")
        cluster.kill("kafka-3")
        took: dict[str, tuple[int | None, float]] = {}

        def stop(w: WorkerProcess) -> None:
            started = time.monotonic()
            code = w.stop(signal.SIGTERM, timeout=60)
            took[w.name] = (code, time.monotonic() - started)

        stoppers = [threading.Thread(target=stop, args=(w,)) for w in workers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for w in workers:
            code, seconds = took[w.name]
            assert seconds < 20.0, (w.name, code, seconds, w.tail())
            # A clean stop, or the deadline's exit, which says so in the log.
            assert code == 0 or (code == EXIT_STOP_DEADLINE and "did not stop within" in w.tail(200)), (code, w.tail())
        cluster.up()  # kafka-3 back with its partitions
        after = WorkerProcess({**env, "GRADEFLOW_DATA_DIR": f"{env['GRADEFLOW_DATA_DIR']}-w3"}, name="w3")
        workers.append(after)
        after.start(ready_timeout=120)

        def delivered() -> dict[str, list[tuple]]:
            got: dict[str, dict[str, tuple]] = {}
            for _t, _k, value in consume(bootstrap, [topic], idle_s=3, timeout_s=60, env=env):
                doc = orjson.loads(value)
                got.setdefault(doc["customer_id"], {})[doc["event_id"]] = summary(doc)
            return {c: list(v.values()) for c, v in got.items()}

        wait_until(lambda: delivered() == expected, timeout=180, interval=3,
                   what="every grade change of the offline run, once the broker is back")
    finally:
        for w in workers:
            w.stop(signal.SIGKILL)


def test_exactly_once_with_a_broker_of_three_killed_every_change_once(cluster):
    """exactly_once on three brokers (replication factor 3, min.insync.replicas 2, the transaction
    log replicated too): a broker killed mid-stream and restarted; a read_committed consumer sees
    every change of the offline run exactly once, and each bad record's dead letter once."""
    from tests.faults.test_exactly_once import Run, finish, graded_up_to, long_history
    from tests.faults.test_exactly_once import wait_until as wait_for

    cluster.up()
    bootstrap = cluster.env["GRADEFLOW_KAFKA_BOOTSTRAP"]
    records = long_history()
    offline = Offline(list[tuple[bytes | None, bytes | None]](records))
    expected = sum(len(seq) for seq in offline.changes.values())
    run = Run(bootstrap, "3b", "exactly_once", GRADEFLOW_REPLICATION_FACTOR="3", GRADEFLOW_MIN_INSYNC_REPLICAS="2")
    try:
        p = KafkaProducer(**kafka_options(bootstrap, run.env), acks="all", linger_ms=5)
        for key, value in records:
            p.send(run.env["GRADEFLOW_TOPIC_TRANSACTIONS"], key=key, value=value)
        p.flush()
        p.close()
        run.start("w1")
        run.start("w2")
        wait_for(graded_up_to(run, expected, 0.3), 120, lambda: f"no progress\n{run.logs()}")
        cluster.kill("kafka-2")  # mid-stream; transactions go on with two in-sync replicas
        wait_for(graded_up_to(run, expected, 0.6), 120, lambda: f"stalled with kafka-2 down\n{run.logs()}")
        cluster.up()
        got = finish(run, offline, timeout_s=180)
        assert got.copies == 0, f"{got.copies} changes read twice by a read_committed consumer\n{run.logs()}"
        assert got.changes == offline.changes, run.logs()
        assert got.total == expected, "a change read twice, or one missing"
        assert run.dead_letters() == (len(offline.dead), 0), "dead letters missing or read twice"
    finally:
        run.stop()
        cluster.up()
