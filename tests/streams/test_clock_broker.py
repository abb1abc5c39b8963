"""The clock on the real broker: a key customer who stops buying is downgraded by time alone."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load
from streams.tools.local import consume, produce, unique_env
from tests.streams.partitionhelp import partition_of
from streams.processor import TRANSACTIONS, Record, process_batch, utcnow
from tests.streams.partitionhelp import customers_on

pytestmark = pytest.mark.slow
RS = compile_ruleset(load("rfm-5"))
PARTITIONS = 4
DUE = "2026-03-18T00:00:00+08:00"  # key: A (R5 F2 M3) until recency reaches 8 days: R4, 9 → B


def other_partition(name: str) -> str:
    i = 0
    while partition_of(f"other{i}".encode(), PARTITIONS) == partition_of(name.encode(), PARTITIONS):
        i += 1
    return f"other{i}"


KEY = "keycust"
[PUSHER] = customers_on(partition_of(KEY.encode(), PARTITIONS), 1, PARTITIONS, prefix="pusher")
OTHER = other_partition(KEY)


def txn(event_id: str, customer: str, at: str, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({"event_id": event_id, "customer_id": customer, "occurred_at": at,
                                            "type": "purchase", "amount": amount, "currency": "CNY"})


PHASE1 = [txn("k1", KEY, "2026-03-10T10:00:00+08:00", "2500"), txn("k2", KEY, "2026-03-10T11:00:00+08:00", "2500"),
          txn("p1", PUSHER, "2026-03-12T10:00:00+08:00", "1"),
          # stream time of another partition passing the key customer's due instant wakes nobody there
          txn("o1", OTHER, "2026-04-01T10:00:00+08:00", "1")]
PHASE2 = [txn("p2", PUSHER, "2026-03-19T10:00:00+08:00", "1")]
PHASE3 = [txn("p3", PUSHER, "2026-03-25T10:00:00+08:00", "1")]


def env_for(**extra: str) -> dict[str, str]:
    # No at-risk warnings unless a test asks (test_a_key_customer_is_warned_once_before_the_downgrade).
    return unique_env("clock", **{"GRADEFLOW_CLOCK": "event", "GRADEFLOW_CLOCK_TICK_S": "0.2",
                                   "GRADEFLOW_PARTITIONS": str(PARTITIONS), "GRADEFLOW_DOWNSTREAM": "false",
                                   "GRADEFLOW_AT_RISK_HORIZON_DAYS": "0", **extra})


def read(bootstrap: str, env: dict[str, str], until: int | None = None, idle_s: float = 4.0) -> tuple[list, list]:
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"]]
    changes: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for topic, _, value in consume(bootstrap, topics, until=until, idle_s=idle_s, timeout_s=60):
        (changes if topic == topics[0] else alerts).append(orjson.loads(value))
    return changes, alerts


def clock_changes(changes: list) -> list[tuple]:
    return [(c["customer_id"], c["previous_grade"], c["grade"], c["as_of"]) for c in changes
            if c["cause"]["kind"] == "clock"]


def final(changes: list) -> dict[str, str]:
    out = {}
    for c in changes:
        out[c["customer_id"]] = c["grade"]
    return out


def offline(history: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Grades of every customer as of its partition's stream time, computed without a worker."""
    store: dict[str, bytes] = {}
    records = [Record(TRANSACTIONS, "t", partition_of(k, PARTITIONS), i, k, v) for i, (k, v) in enumerate(history)]
    result = process_batch(records, RS, store, utcnow())
    stream: dict[int, float] = {}
    for k, v in history:
        p = partition_of(k, PARTITIONS)
        ts = datetime.fromisoformat(orjson.loads(v)["occurred_at"]).timestamp()
        stream[p] = max(stream.get(p, ts), ts)
    from rules.state import CustomerState

    out = {}
    for customer, (raw, _) in result.states.items():
        state = CustomerState.from_bytes(raw)
        at = datetime.fromtimestamp(stream[partition_of(customer.encode(), PARTITIONS)], RS.tz)
        out[customer] = evaluate(RS, state, at).grades["value"]
    return out


def test_event_clock_downgrades_a_customer_who_stops_buying_and_a_replay_agrees(worker_factory, bootstrap):
    env = env_for()
    worker_factory(env=env)
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE1)
    changes, _ = read(bootstrap, env, until=4)  # key: B then A; pusher and other: B
    assert sorted(c["customer_id"] for c in changes) == sorted([KEY, KEY, PUSHER, OTHER])
    time.sleep(1.5)  # several ticks: nothing is due on the key customer's partition yet
    changes, alerts = read(bootstrap, env, idle_s=2)
    assert clock_changes(changes) == [] and alerts == []

    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE2)
    changes, alerts = read(bootstrap, env, until=6)  # 4 changes, the downgrade and its alert
    changes, alerts = read(bootstrap, env, idle_s=3)
    assert clock_changes(changes) == [(KEY, "A", "B", DUE)]
    [down] = [c for c in changes if c["cause"]["kind"] == "clock"]
    assert down["direction"] == "downgrade" and down["metrics"]["code"] == "423"
    assert [(a["customer_id"], a["previous_grade"], a["grade"], a["severity"], a["as_of"], a["grade_change_event_id"])
            for a in alerts] == [(KEY, "A", "B", "critical", DUE, down["event_id"])]
    assert final(changes) == offline(PHASE1 + PHASE2)

    # A replay of the same history by a fresh app (all at once) gives the same changes, same ids.
    replay = env_for(GRADEFLOW_TOPIC_TRANSACTIONS=env["GRADEFLOW_TOPIC_TRANSACTIONS"])
    worker_factory(env=replay)
    again, again_alerts = read(bootstrap, replay, until=len(changes) + len(alerts), idle_s=20)
    again, again_alerts = read(bootstrap, replay, idle_s=3)
    assert final(again) == final(changes)
    assert sorted(c["event_id"] for c in again) == sorted(c["event_id"] for c in changes)
    assert [a["alert_id"] for a in again_alerts] == [a["alert_id"] for a in alerts]


def test_a_restarted_worker_rebuilds_the_schedule_from_the_changelog(worker_factory, bootstrap):
    env = env_for(GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    first = worker_factory(env=env)
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE1)
    changes, _ = read(bootstrap, env, until=4)
    assert clock_changes(changes) == []
    time.sleep(1.0)  # the state is on the changelog before the crash
    first.kill()

    second = worker_factory(env=env, name="restarted")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE2)
    changes, alerts = read(bootstrap, env, until=6, idle_s=40)
    changes, alerts = read(bootstrap, env, idle_s=3)
    assert clock_changes(changes) == [(KEY, "A", "B", DUE)], second.tail()
    # more stream time: the change is not made again (the schedule resumed after it)
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE3)
    time.sleep(2.0)
    changes, alerts = read(bootstrap, env, idle_s=3)
    assert clock_changes(changes) == [(KEY, "A", "B", DUE)]
    assert [(a["customer_id"], a["grade"]) for a in alerts] == [(KEY, "B")]
    assert final(changes) == offline(PHASE1 + PHASE2 + PHASE3)


def test_wall_clock_brings_an_old_history_up_to_now(worker_factory, bootstrap):
    from rules.schedule import next_change_at, regrade
    from rules.state import CustomerState

    env = env_for(GRADEFLOW_CLOCK="wall")
    worker_factory(env=env)
    history = PHASE1[:2]
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history)
    # expected: every change time alone made between the last purchase and now, each at its instant
    store: dict[str, bytes] = {}
    result = process_batch([Record(TRANSACTIONS, "t", 0, i, k, v) for i, (k, v) in enumerate(history)], RS, store,
                           utcnow())
    state = CustomerState.from_bytes(result.states[KEY][0])
    want, after = [], datetime.fromisoformat("2026-03-10T11:00:00+08:00")
    while (due := next_change_at(RS, state, after)) is not None and due.timestamp() < time.time():
        for c in regrade(KEY, RS, state, due, utcnow())[0]:
            want.append((KEY, c["previous_grade"], c["grade"], c["as_of"]))
        after = due
    assert want[:1] == [(KEY, "A", "B", DUE)]
    changes, _ = read(bootstrap, env, until=2 + len(want), idle_s=20)
    changes, _ = read(bootstrap, env, idle_s=3)
    assert clock_changes(changes) == want


def test_two_workers_each_wake_only_their_own_partitions(worker_factory, bootstrap):
    import re

    env = env_for(GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    workers = [worker_factory(env={**env, "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + f"-{n}"}, name=f"w{n}")
               for n in (1, 2)]
    keys = [f"key{i}" for i in range(8)]
    pushers = {}
    for i in range(200):
        pushers.setdefault(partition_of(f"push{i}".encode(), PARTITIONS), f"push{i}")
    assert len(pushers) == PARTITIONS
    first = [r for k in keys for r in (txn(f"{k}-1", k, "2026-03-10T10:00:00+08:00", "2500"),
                                         txn(f"{k}-2", k, "2026-03-10T11:00:00+08:00", "2500"))]
    first += [txn(f"{p}-1", p, "2026-03-12T10:00:00+08:00", "1") for p in pushers.values()]
    time.sleep(3)  # let the group settle with both members
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], first)
    changes, _ = read(bootstrap, env, until=2 * len(keys) + len(pushers), idle_s=30)
    assert clock_changes(changes) == []
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
            [txn(f"{p}-2", p, "2026-03-19T10:00:00+08:00", "1") for p in pushers.values()])
    want = 2 * len(keys) + len(pushers) + 2 * len(keys)  # + one clock downgrade and one alert per key customer
    changes, alerts = read(bootstrap, env, until=want, idle_s=30)
    time.sleep(2)
    changes, alerts = read(bootstrap, env, idle_s=3)
    assert sorted(clock_changes(changes)) == sorted((k, "A", "B", DUE) for k in keys)
    assert sorted(a["customer_id"] for a in alerts) == sorted(keys)
    # each partition's customers were woken by one worker
    woke = [set(re.findall(r"clock woke \d+ customers on partition (\d+)", w.log_path.read_text())) for w in workers]
    assert all(woke) and not (woke[0] & woke[1]), woke


def test_a_key_customer_is_warned_once_before_the_downgrade_even_across_a_restart(worker_factory, bootstrap):
    from schemas.events import Alert

    env = env_for(GRADEFLOW_AT_RISK_HORIZON_DAYS="7", GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10",
                  GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    first = worker_factory(env=env)
    # stream time of the key customer's partition reaches 03-12 (the pusher): the drop at 03-18 is
    # within 7 days
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE1)
    changes, alerts = read(bootstrap, env, until=5, idle_s=30)  # 4 changes and the warning
    changes, alerts = read(bootstrap, env, idle_s=2)
    assert clock_changes(changes) == []
    [warning] = alerts
    Alert.model_validate(warning)
    assert (warning["kind"], warning["customer_id"], warning["previous_grade"], warning["grade"], warning["due_at"],
            warning["as_of"], warning["severity"]) == ("at_risk", KEY, "A", "B", DUE, "2026-03-11T00:00:00+08:00",
                                                        "info"), first.tail()
    time.sleep(1.0)  # the state (with the warning's mark) is on the changelog before the crash
    first.kill()

    second = worker_factory(env=env, name="restarted")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], PHASE2)
    changes, alerts = read(bootstrap, env, until=7, idle_s=40)  # + the downgrade and its alert
    changes, alerts = read(bootstrap, env, idle_s=3)
    assert clock_changes(changes) == [(KEY, "A", "B", DUE)], second.tail()
    [down] = [c for c in changes if c["cause"]["kind"] == "clock"]
    assert [(a.get("kind", "downgrade"), a["alert_id"]) for a in alerts] == [
        ("at_risk", warning["alert_id"]), ("downgrade", alerts[1]["alert_id"])], second.tail()
    assert alerts[1]["grade_change_event_id"] == warning["grade_change_event_id"] == down["event_id"]
