"""A worker stops within 20 s of SIGTERM whatever Redis does, and mid-backlog; Redis down degrades the
downstream side only (a gauge, one log line per change of state), and nothing is skipped or lost."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from tests.streams.downstream_helpers import wait_until
from tests.streams.redishelp import RedisServer
from streams.tools.local import WorkerProcess, consume, free_port, kafka_options, produce, unique_env
from tests.streams.faustext.test_standby import purchase

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

STOP_WITHIN_S = 20.0
DOWN_LINE = "gradeflow: Redis is unreachable"
UP_LINE = "gradeflow: Redis is reachable again"


def topic_size(bootstrap: str, topic: str) -> int:
    """Records on ``topic`` (the sum of its partitions' end offsets)."""
    consumer = KafkaConsumer(**kafka_options(bootstrap), group_id=None)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        consumer.close()


def redis_up(worker: WorkerProcess) -> float | None:
    """The worker's gradeflow_redis_up gauge, or None before it is exported."""
    url = f"http://127.0.0.1:{worker.env['GRADEFLOW_WEB_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r"^gradeflow_redis_up (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else None


def timed_stop(worker: WorkerProcess) -> tuple[int | None, float]:
    """SIGTERM the worker; its exit code and the seconds it took (SIGKILL after 60 s: a failure)."""
    started = time.monotonic()
    code = worker.stop(signal.SIGTERM, timeout=60)
    return code, time.monotonic() - started


def log_count(worker: WorkerProcess, line: str) -> int:
    assert worker.log_path is not None
    return worker.log_path.read_text(errors="replace").count(line)


def customers_on(bootstrap: str, topic: str, expected: int) -> set[str]:
    return {orjson.loads(v)["customer_id"] for _t, _k, v in consume(bootstrap, [topic], until=None, idle_s=3,
                                                                     timeout_s=60)} if expected else set()


def test_redis_unreachable_from_the_start_grading_goes_on_and_sigterm_stops_the_worker(worker_factory, bootstrap,
                                                                                       tmp_path: Path):
    redis = RedisServer(tmp_path)  # its port, with nothing listening on it yet
    worker = worker_factory(GRADEFLOW_REDIS_URL=redis.url, GRADEFLOW_WEB_PORT=str(free_port()))
    env = worker.env
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], [purchase(f"c{i}", f"e{i}", 2, "100") for i in range(40)])
    # Grading does not wait for Redis; the redis-writer and the alert dispatcher hold their records.
    wait_until(lambda: topic_size(bootstrap, env["GRADEFLOW_TOPIC_GRADE_CHANGES"]) >= 40, timeout=60,
               what="40 grade changes")
    wait_until(lambda: redis_up(worker) == 0.0, timeout=30, what="gradeflow_redis_up 0")
    code, took = timed_stop(worker)
    assert code == 0 and took < STOP_WITHIN_S, (code, took, worker.tail())
    assert log_count(worker, DOWN_LINE) == 1, worker.tail()
    # The records given up at the stop were not acknowledged: with Redis there, a restart writes them all.
    redis.start()
    try:
        worker_factory(env=env, name="redis-back")
        client = redis.client()
        prefix = env["GRADEFLOW_APP_ID"]
        wait_until(lambda: all(client.exists(f"{prefix}:customer:c{i}") for i in range(40)), timeout=60,
                   what="every grade change held at the stop written to Redis after the restart")
    finally:
        redis.stop()


def test_redis_down_up_down_is_logged_once_per_change_and_no_grade_change_is_skipped(worker_factory, bootstrap,
                                                                                        tmp_path: Path):
    redis = RedisServer(tmp_path).start()
    try:
        worker = worker_factory(GRADEFLOW_REDIS_URL=redis.url, GRADEFLOW_WEB_PORT=str(free_port()))
        env = worker.env
        wait_until(lambda: redis_up(worker) == 1.0, timeout=30, what="gradeflow_redis_up 1")
        redis.stop()
        wait_until(lambda: redis_up(worker) == 0.0, timeout=30, what="gradeflow_redis_up 0")
        # Graded while Redis is down: the grade changes wait for it.
        produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
                [purchase(f"c{i}", f"e{i}", 2, "100") for i in range(30)])
        wait_until(lambda: topic_size(bootstrap, env["GRADEFLOW_TOPIC_GRADE_CHANGES"]) >= 30, timeout=60,
                   what="30 grade changes")
        redis.start()
        wait_until(lambda: redis_up(worker) == 1.0, timeout=30, what="gradeflow_redis_up 1 again")
        client = redis.client()
        prefix = env["GRADEFLOW_APP_ID"]
        wait_until(lambda: all(client.exists(f"{prefix}:customer:c{i}") for i in range(30)), timeout=60,
                   what="every customer's grade in Redis once it is back")
        redis.stop()
        wait_until(lambda: redis_up(worker) == 0.0, timeout=30, what="gradeflow_redis_up 0 again")
        assert (log_count(worker, DOWN_LINE), log_count(worker, UP_LINE)) == (2, 1), worker.tail()
        code, took = timed_stop(worker)
        assert code == 0 and took < STOP_WITHIN_S, (code, took, worker.tail())
    finally:
        redis.stop()


def test_sigterm_mid_backlog_stops_in_time_and_a_restart_grades_the_rest(worker_factory, bootstrap):
    customers = 40_000
    worker = worker_factory(GRADEFLOW_WEB_PORT=str(free_port()))
    env = worker.env
    worker.stop()  # the topics exist; the backlog is produced while no worker runs
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
            [purchase(f"c{i}", f"e{i}", 2, "100") for i in range(customers)])
    changes = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
    worker = worker_factory(env=env, name="mid-backlog")
    wait_until(lambda: topic_size(bootstrap, changes) > 0, timeout=60, interval=0.1, what="grading under way")
    code, took = timed_stop(worker)
    graded_at_stop = topic_size(bootstrap, changes)
    assert graded_at_stop < customers, "the backlog was graded before the stop: the test proves nothing"
    assert code == 0 and took < STOP_WITHIN_S, (code, took, worker.tail())
    # Every customer's first purchase gives one grade change: all of them are there after a restart.
    worker_factory(env=env, name="after-restart")
    wait_until(lambda: topic_size(bootstrap, changes) >= customers, timeout=180, what="the rest graded")
    assert customers_on(bootstrap, changes, customers) == {f"c{i}" for i in range(customers)}


def set_consumer_quota(bootstrap: str, client_id: str, bytes_per_s: int | None) -> None:
    """Throttle (or, with None, stop throttling) fetches of Kafka client ``client_id`` on the
    broker: a slow network or a busy broker, made real with a client quota (Kafka's own tool)."""
    kafka = Path(__file__).resolve().parents[2] / ".local" / "kafka"
    change = (["--add-config", f"consumer_byte_rate={bytes_per_s}"] if bytes_per_s is not None
              else ["--delete-config", "consumer_byte_rate"])
    subprocess.run(["java", "-cp", str(kafka / "libs" / "*"),
                    f"-Dlog4j2.configurationFile={kafka / 'tools-log4j2.xml'}", "kafka.admin.ConfigCommand",
                    "--bootstrap-server", bootstrap.split(",")[0], "--alter", *change,
                    "--entity-type", "clients", "--entity-name", client_id],
                   check=True, capture_output=True, timeout=60)


def test_sigterm_mid_recovery_stops_in_time_and_a_restart_recovers_every_state(worker_factory, bootstrap):
    customers = 20_000
    env = unique_env("stoprec", GRADEFLOW_WEB_PORT=str(free_port()))
    env["GRADEFLOW_KAFKA_CLIENT_ID"] = env["GRADEFLOW_APP_ID"]
    changes = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
    worker = worker_factory(env=env, name="grades")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
            [purchase(f"c{i}", f"e{i}", 2, "100") for i in range(customers)])
    wait_until(lambda: topic_size(bootstrap, changes) >= customers, timeout=180, what="every customer graded")
    worker.stop()
    # Fetches of this worker now crawl: its changelog recovery takes minutes instead of a second.
    set_consumer_quota(bootstrap, env["GRADEFLOW_KAFKA_CLIENT_ID"], 50_000)
    recovering = WorkerProcess(env, name="recovering")
    try:
        recovering.start(wait_ready=False)
        assert recovering.log_path is not None
        wait_until(lambda: "Reading Starts At - Active" in recovering.log_path.read_text(errors="replace"),
                   timeout=60, what="the changelog recovery under way")
        code, took = timed_stop(recovering)
        log = recovering.log_path.read_text(errors="replace")
        assert "Done reading from changelog topics" not in log, "recovery ended before the stop: proves nothing"
        assert code == 0 and took < STOP_WITHIN_S, (code, took, recovering.tail())
    finally:
        recovering.stop(signal.SIGKILL)
        set_consumer_quota(bootstrap, env["GRADEFLOW_KAFKA_CLIENT_ID"], None)
    # Nothing of the state was lost with the interrupted recovery: the next worker grades a second
    # purchase of each customer from the first (an upgrade with both purchases counted, never an
    # "initial" grade from empty state).
    worker_factory(env=env, name="after-recovery")
    probes = [f"c{i}" for i in range(0, customers, 200)]
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], [purchase(c, f"probe-{c}", 3, "50000") for c in probes])
    wait_until(lambda: topic_size(bootstrap, changes) >= customers + len(probes), timeout=120,
               what="the probes graded")
    docs = [orjson.loads(v) for _t, _k, v in consume(bootstrap, [changes], idle_s=3, timeout_s=60)]
    probed = {d["customer_id"]: d for d in docs if d["cause"]["event_id"] and d["cause"]["event_id"].startswith("probe-")}
    assert probed.keys() == set(probes)
    for doc in probed.values():
        assert doc["direction"] == "upgrade" and doc["metrics"]["frequency"] == 2, doc
