"""Promotion and rollback of a ruleset on the broker (streams/rules_control.py, docs/rules-lifecycle.md).

Two workers grade a stream; ``gradeflow rules promote`` switches them mid-stream, ``gradeflow rules
rollback`` switches them back, both with ``--wait``. Per customer, in offset order on grade-changes,
the versions go v1 → v2 → v1 and never back (no customer graded by the old version after its
worker switched), every change a switch made has cause ``rules`` with the promotion's id and the
version before, none twice, and the grades at the end are an offline run's of the whole history
under v1. A worker restarted in the middle of a promotion's re-grade keeps the promoted version
(GRADEFLOW_RULESET still names the old one) and finishes where the first run stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import PRESETS_DIR, parse
from rules.state import CustomerState
from streams.processor import TRANSACTIONS, Record, process_batch
from streams.rules_control import latest_control, read_topic
from streams.settings import load_settings
from streams.tools.local import ROOT, consume, free_port
from tests.streams.downstream_helpers import wait_until
from tests.streams.producerhelp import produce_librdkafka as produce

pytestmark = [pytest.mark.timeout(300)]

V1 = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")
# Version 2: A needs 11 points instead of 10.
V2 = V1.replace('version: "1"', 'version: "2"').replace("{min: 10, grade: A}", "{min: 11, grade: A}")
AMOUNTS = ("100", "300", "700", "1100", "1500", "1900")


def purchase(customer: str, n: int, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({
        "event_id": f"{customer}-{n}", "customer_id": customer, "type": "purchase",
        "occurred_at": f"2026-05-{n + 1:02d}T10:00:00+08:00", "amount": amount, "currency": "CNY"})


def rounds(customers: int, count: int) -> list[list[tuple[bytes, bytes]]]:
    """``count`` rounds of one purchase per customer; customers spend different amounts, so that
    at any round some of them stand at exactly 10 points (A under v1, B under v2)."""
    return [[purchase(f"c{i:03d}", n, AMOUNTS[i % len(AMOUNTS)]) for i in range(customers)] for n in range(count)]


def offline(ruleset: CompiledRuleset, history: list[tuple[bytes, bytes]]) -> dict[str, dict[str, str]]:
    """Each customer's grades after ``history``, by the hot path the workers run."""
    store: dict[str, bytes] = {}

    class Store:
        def get(self, customer_id: str) -> bytes | None:
            return store.get(customer_id)

    records = [Record(TRANSACTIONS, "t", 0, i, k, v) for i, (k, v) in enumerate(history)]
    result = process_batch(records, ruleset, Store(), datetime(2026, 6, 1, tzinfo=timezone.utc), check_keys=False)
    return {c: dict(CustomerState.from_bytes(raw).grades) for c, (raw, _) in result.states.items()}


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def cli(env: dict[str, str], *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "streams.tools.cli", "rules", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def changes_of(bootstrap: str, env: dict[str, str], idle_s: float = 6) -> list[dict[str, Any]]:
    """grade-changes from its beginning, in offset order per partition (so per customer)."""
    return [orjson.loads(v) for _, _, v in consume(bootstrap, [env["GRADEFLOW_TOPIC_GRADE_CHANGES"]],
                                                   idle_s=idle_s, timeout_s=120)]


def control_records(bootstrap: str, env: dict[str, str]) -> list[Any]:
    settings = load_settings(kafka_bootstrap=bootstrap, app_id=env["GRADEFLOW_APP_ID"])
    records, _ = read_topic(settings)
    return [latest_control(records[: i + 1]) for i in range(len(records)) if records[i][0] == b"active"]


def test_promotion_and_rollback_mid_stream_with_two_workers(worker_factory, bootstrap, tmp_path: Path) -> None:
    rules_v1, rules_v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    rules_v1.write_text(V1, encoding="utf-8")
    rules_v2.write_text(V2, encoding="utf-8")
    ports = [free_port(), free_port()]
    first = worker_factory(GRADEFLOW_RULESET=str(rules_v1), GRADEFLOW_WEB_PORT=str(ports[0]))
    env = {k: v for k, v in first.env.items() if k != "GRADEFLOW_WEB_PORT"}
    worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(ports[1])}, name="worker2")
    stream = rounds(150, 12)
    sent = [0]
    promoted_event, rolled_event = threading.Event(), threading.Event()

    def producer() -> None:
        # Rounds flow while each switch is made; the stream waits only so that the promotion comes
        # before round 6 and the rollback before round 9, where some customers' grades differ
        # between the versions (customers spending 100 stand at 10 points from round 6 to 9).
        for n, batch in enumerate(stream):
            if n == 6:
                promoted_event.wait(150)
            if n == 9:
                rolled_event.wait(150)
            produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], batch)
            sent[0] += 1
            time.sleep(0.5)  # pacing: rounds keep arriving while a switch is under way

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    wait_until(lambda: sent[0] >= 3, timeout=60, what="three rounds sent")
    assert sent[0] < 6
    promoted = cli(env, "promote", str(rules_v2), "--wait", "--timeout", "120")
    assert promoted.returncode == 0, promoted.stderr + first.tail()
    promoted_event.set()
    assert "promoted rfm-5@2" in promoted.stderr and "every customer is graded by rfm-5@2" in promoted.stderr
    for port in ports:
        status = get_json(port, "/rules")
        assert status["active"] == {"id": "rfm-5", "version": "2"} and status["control_version"] == 1
    wait_until(lambda: sent[0] >= 7, timeout=60, what="seven rounds sent")
    rolled = cli(env, "rollback", "--wait", "--timeout", "120")
    rolled_event.set()
    assert rolled.returncode == 0, rolled.stderr + first.tail()
    assert "rolled back to rfm-5@1 from rfm-5@2" in rolled.stderr
    thread.join(60)
    assert sent[0] == len(stream)

    for port in ports:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'gradeflow_rules_active{ruleset="rfm-5",version="1"} 1.0' in metrics
        assert "gradeflow_rules_control_version 2.0" in metrics and "gradeflow_rules_switches_total 2.0" in metrics
    promotion, rollback = control_records(bootstrap, env)
    assert (promotion.action, promotion.control_version, promotion.previous.version) == ("promote", 1, "1")
    assert (rollback.action, rollback.control_version, rollback.ruleset.version) == ("rollback", 2, "1")
    history = [record for batch in stream for record in batch]
    expected = offline(compile_ruleset(parse(V1)), history)

    def settled() -> Any:
        docs = changes_of(bootstrap, env)
        last: dict[str, dict[str, str]] = defaultdict(dict)
        for d in docs:
            last[d["customer_id"]][d["ladder"]] = d["grade"]
        return docs if last == expected else None

    changes = wait_until(settled, timeout=90, interval=1, what="the grades of an offline run under v1")

    by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in changes:
        by_customer[d["customer_id"]].append(d)
    rules_ids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for customer, docs in by_customer.items():
        versions: list[str] = []
        for d in docs:
            if not versions or versions[-1] != d["ruleset"]["version"]:
                versions.append(d["ruleset"]["version"])
        # After the switch to v2 nothing by v1 until the rollback, and nothing by v2 after it.
        assert versions == ["1", "2", "1"][: len(versions)], (customer, [(d["ruleset"]["version"], d["cause"])
                                                                          for d in docs])
        for d in docs:
            cause = d["cause"]
            if cause["kind"] != "rules":
                assert "previous_ruleset" not in cause
                continue
            if d["ruleset"]["version"] == "2":
                assert cause == {"kind": "rules", "event_id": promotion.promotion_id,
                                 "previous_ruleset": {"id": "rfm-5", "version": "1"}}
            else:
                assert cause == {"kind": "rules", "event_id": rollback.promotion_id,
                                 "previous_ruleset": {"id": "rfm-5", "version": "2"}}
            rules_ids[(customer, d["ladder"], cause["event_id"])].add(d["event_id"])
    # Each switch re-graded each customer once: one change per ladder at most (a redelivery has the same id).
    assert all(len(ids) == 1 for ids in rules_ids.values()), {k: v for k, v in rules_ids.items() if len(v) > 1}
    assert {event for (_, _, event) in rules_ids} == {promotion.promotion_id, rollback.promotion_id}


def test_a_restart_mid_promotion_keeps_the_promoted_version_and_resumes_the_regrade(
        worker_factory, bootstrap, tmp_path: Path) -> None:
    rules_v1, rules_v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    rules_v1.write_text(V1, encoding="utf-8")
    rules_v2.write_text(V2, encoding="utf-8")
    port = free_port()
    # Small, throttled re-grade steps: the restart lands in the middle of it.
    worker = worker_factory(GRADEFLOW_RULESET=str(rules_v1), GRADEFLOW_WEB_PORT=str(port),
                            GRADEFLOW_RULES_REGRADE_CHUNK="25", GRADEFLOW_RULES_REGRADE_PAUSE_S="0.25",
                            GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="6", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1")
    env = worker.env
    customers = 400
    # Three purchases of 1100: R5 F3 M2 = 10 points, A under v1 and B under v2, for every customer.
    history = [purchase(f"c{i:03d}", n, "1100") for n in range(3) for i in range(customers)]
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history)
    wait_until(lambda: sum(1 for d in changes_of(bootstrap, env, idle_s=2) if d["grade"] == "A") == customers,
               timeout=90, interval=1, what="every customer graded A by v1")

    promoted = cli(env, "promote", str(rules_v2))
    assert promoted.returncode == 0, promoted.stderr
    midway = wait_until(lambda: (s := get_json(port, "/rules"))["control_version"] == 1
                        and 50 <= s["regrade"]["customers_done"] <= customers - 100 and s, timeout=60, interval=0.1,
                        what="the re-grade under way")
    assert midway["regrade_complete"] is False and midway["regrade"]["eta_s"] is not None
    worker.kill()  # a crash in the middle of the re-grade

    again = worker_factory(env=env, name="restarted")
    log = again.log_path.read_text() if again.log_path else ""
    assert "ruleset rfm-5@2 is active by rules-control v1" in log and "NOT used" in log
    done = wait_until(lambda: (s := get_json(port, "/rules"))["regrade_complete"] and s, timeout=90, interval=0.5,
                      what="the restarted worker's re-grade complete")
    assert done["active"] == {"id": "rfm-5", "version": "2"}
    # It re-graded only what the first run had not: the customers whose new state was written stay done.
    assert 0 < done["regrade"]["regraded"] <= customers - midway["regrade"]["regraded"]

    rules = [d for d in changes_of(bootstrap, env) if d["cause"]["kind"] == "rules"]
    ids: dict[str, set[str]] = defaultdict(set)
    for d in rules:
        assert (d["ruleset"]["version"], d["previous_grade"], d["grade"]) == ("2", "A", "B")
        ids[d["customer_id"]].add(d["event_id"])
    # Every customer re-graded once: one change each (a chunk in flight at the crash may be sent twice, same id).
    assert len(ids) == customers and all(len(v) == 1 for v in ids.values())
