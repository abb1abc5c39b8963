"""Measure how long a worker takes to recover its table, per store, on the local broker.

    python deploy/measure_recovery.py --customers 100000

For each store: grade one purchase for each of N customers with one worker, stop it, then time
a new worker from process start to "tables recovered" (the ready line):
  memory        — the new worker replays the whole changelog into memory;
  rocksdb-warm  — RocksDB, same data dir (a restarted pod with its volume): only the tail;
  rocksdb-cold  — RocksDB, empty data dir (a pod on a new node): the whole changelog, into RocksDB.
A fresh app with no state gives the fixed start-up cost ("baseline"). Numbers go to docs/deploy.md.

    python deploy/measure_recovery.py --failover --customers 100000 [--standbys 0,1] [--session-timeout 10]

Failover, per store, standby setting and way of stopping (each on a fresh app): two workers in one
group grade one purchase for each of N customers; then one of them is stopped, gracefully
(``term``: SIGTERM, it leaves the group, as in a rolling upgrade) or with SIGKILL (``kill``: a crash,
noticed by the group only after the session timeout). A probe purchase is then produced for one
customer on every partition the stopped worker owned, and the time is taken from the stop signal
to the last probe's grade change (its record timestamp on the grade-changes topic): the
survivor has then taken the partitions over, recovered their state and graded on it. Each line
also gives, from the survivor's log, when its rebalance started and its recovery ended after the
stop, and the changelog records it re-read (its recovery tables: highwater minus the offset it
started reading at), for the partitions it took over and for its own.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from streams.tools.local import (WorkerProcess, faust_log_tables, free_port, group_assignment, kafka_options,  # noqa: E402
                           produce, unique_env, wait_group)
from kafka.partitioner.default import murmur2  # noqa: E402
from streams.settings import load_settings  # noqa: E402

READY = re.compile(rb"tables recovered|Recovery\]: Worker ready")
STATS = re.compile(rb"gradeflow-stats (\{.*\})")


def wait_ready(worker: WorkerProcess, timeout: float = 900) -> float:
    """Start ``worker`` and return seconds from process start to its ready line."""
    started = time.monotonic()
    worker.start(ready_timeout=timeout)  # waits for "Ready" (Faust's, may precede recovery)
    assert worker.log_path is not None, "a started worker has a log"
    while not READY.search(worker.log_path.read_bytes()):
        if time.monotonic() - started > timeout:
            raise TimeoutError(worker.tail())
        time.sleep(0.05)
    return time.monotonic() - started


def consumed(worker: WorkerProcess) -> int:
    """The worker's ``consumed`` count from its last gradeflow-stats line (0 before the first)."""
    found = STATS.findall(worker.log_path.read_bytes()) if worker.log_path else []
    return int(orjson.loads(found[-1])["consumed"]) if found else 0


def wait_consumed(worker: WorkerProcess, n: int, timeout: float = 1800, *others: WorkerProcess) -> None:
    """Wait until ``worker`` (with ``others``, together) has consumed ``n`` records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(consumed(w) for w in (worker, *others)) >= n:
            return
        time.sleep(0.5)
    raise TimeoutError(worker.tail())


def events(n: int):
    for i in range(n):
        c = f"c{i:08d}"
        yield c.encode(), orjson.dumps({"event_id": f"e{i}", "customer_id": c, "occurred_at": "2026-01-01T10:00:00+08:00",
                                        "type": "purchase", "amount": "100", "currency": "CNY"})


def measure(store: str, n: int, bootstrap: str) -> dict[str, float]:
    env = unique_env(f"recovery-{store.rstrip(':/')}", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_STORE=store,
                     GRADEFLOW_REPORT_INTERVAL="1", GRADEFLOW_DOWNSTREAM="false")
    out = {}
    loader = WorkerProcess(dict(env), name="loader")
    out["baseline"] = wait_ready(loader)
    t0 = time.monotonic()
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], events(n))
    wait_consumed(loader, n)
    out["grade_eps"] = n / (time.monotonic() - t0)
    loader.stop()
    if store.startswith("rocksdb"):
        warm = WorkerProcess(dict(env), name="warm")
        out["rocksdb-warm"] = wait_ready(warm)
        warm.stop()
        cold = WorkerProcess({**env, "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + "-cold"}, name="cold")
        out["rocksdb-cold"] = wait_ready(cold)
        cold.stop()
    else:
        again = WorkerProcess({**env, "GRADEFLOW_DATA_DIR": env["GRADEFLOW_DATA_DIR"] + "-2"}, name="again")
        out["memory"] = wait_ready(again)
        again.stop()
    return out


LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] .*?(Revoking previously assigned partitions|"
                       r"\[\^---Recovery\]: Recovery complete)", re.M)


def log_events_after(text: str, since: float) -> dict[str, float]:
    """Wall times of the first rebalance start, and of the end of the recovery it started, after ``since``."""
    out: dict[str, float] = {}
    for m in LOG_STAMP.finditer(text):
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()  # Faust stamps local time
        if at < since:
            continue
        key = "rebalance" if m.group(2).startswith("Revoking") else "recovered"
        if key == "recovered" and "rebalance" not in out:
            continue  # the end of an earlier recovery
        out.setdefault(key, at)
    return out


def replayed_after(text: str, since: float, changelog: str, taken: set[int]) -> tuple[int, int]:
    """Changelog records the survivor re-read at its first recovery after ``since``: (taken over, own)."""
    starts = [rows for at, rows in faust_log_tables(text, "Reading Starts At - Active") if at >= since]
    highs = [rows for at, rows in faust_log_tables(text, "Highwater - Active") if at >= since]
    if not starts or not highs:
        return -1, -1
    counts = {p: max(0, highs[0][(t, p)] - starts[0].get((t, p), -1))
              for (t, p) in highs[0] if t == changelog}
    return (sum(n for p, n in counts.items() if p in taken), sum(n for p, n in counts.items() if p not in taken))


class ChangeWatcher:
    """Reads the grade-changes topic from its current end, and finds given causes' changes there."""

    def __init__(self, bootstrap: str, topic: str, env: dict[str, str]) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(**kafka_options(bootstrap, env), group_id=None, enable_auto_commit=False)
        parts = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic)]
        self.consumer.assign(parts)
        self.consumer.seek_to_end(*parts)
        for tp in parts:
            self.consumer.position(tp)  # resolve "end" now, before anything is stopped

    def wait_for(self, causes: set[str], timeout_s: float) -> dict[str, tuple[float, dict]]:
        """cause event id → (record timestamp in s, the change), for every cause; raises on timeout."""
        found: dict[str, tuple[float, dict]] = {}
        deadline = time.monotonic() + timeout_s
        while set(found) != causes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no grade change for {sorted(causes - set(found))[:5]}")
            for records in self.consumer.poll(timeout_ms=100).values():
                for r in records:
                    doc = orjson.loads(r.value)
                    cause = doc["cause"].get("event_id")
                    if cause in causes and cause not in found:
                        found[cause] = (r.timestamp / 1000, doc)
        return found

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


@dataclass
class Pair:
    """Two workers of one app, each with its own client id, data dir and web port."""

    env: dict[str, str]
    survivor: WorkerProcess
    other: WorkerProcess

    @classmethod
    def start(cls, env: dict[str, str]) -> "Pair":
        """Start ``w1`` (the survivor), then ``w2`` (the one to stop), and wait for both ready lines."""
        w1, w2 = (WorkerProcess(cls.worker_env(env, n), name=n) for n in ("w1", "w2"))
        pair = cls(env, w1.start(ready_timeout=900), w2)
        try:
            pair.other.start(ready_timeout=900)
        except BaseException:
            pair.stop()
            raise
        return pair

    @staticmethod
    def worker_env(env: dict[str, str], name: str) -> dict[str, str]:
        """``env`` for the worker ``name``: as on its own host (client id, data dir, web port)."""
        return {**env, "GRADEFLOW_KAFKA_CLIENT_ID": name, "GRADEFLOW_DATA_DIR": f"{env['GRADEFLOW_DATA_DIR']}-{name}",
                "GRADEFLOW_WEB_PORT": str(free_port())}

    def stop(self) -> None:
        """Stop both workers (a stopped one is left as it is)."""
        self.other.stop()
        self.survivor.stop()


def wait_settled(pair: Pair, bootstrap: str, timeout_s: float = 1800) -> dict[str, dict[str, set[int]]]:
    """Wait until both workers are in the group and neither is recovering (both /readyz answer 200)."""
    import urllib.error
    import urllib.request

    env = pair.env
    assignment = wait_group(bootstrap, env["GRADEFLOW_APP_ID"], 2, env["GRADEFLOW_TOPIC_TRANSACTIONS"], timeout_s)
    deadline = time.monotonic() + timeout_s
    for worker in (pair.survivor, pair.other):
        url = f"http://127.0.0.1:{worker.env['GRADEFLOW_WEB_PORT']}/readyz"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(worker.tail())
            time.sleep(0.5)
    return assignment


def measure_failover(store: str, standby: int, n: int, bootstrap: str, session_timeout_s: float,
                     how: str) -> dict[str, object]:
    """Two workers grade N customers; stop one (``how``: term or kill); time until the other grades on its partitions."""
    env = unique_env(f"failover-s{standby}", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_STORE=store,
                     GRADEFLOW_STANDBY_REPLICAS=str(standby), GRADEFLOW_REPORT_INTERVAL="1",
                     GRADEFLOW_DOWNSTREAM="false", GRADEFLOW_KAFKA_SESSION_TIMEOUT_S=str(session_timeout_s),
                     GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S=str(min(3.0, session_timeout_s / 3)))
    transactions, changelog = env["GRADEFLOW_TOPIC_TRANSACTIONS"], f"{env['GRADEFLOW_APP_ID']}-customer-state-changelog"
    partitions = load_settings().partitions
    pair = Pair.start(env)
    try:
        wait_settled(pair, bootstrap)
        t0 = time.monotonic()
        produce(bootstrap, transactions, events(n))
        wait_consumed(pair.survivor, n, 3600, pair.other)
        load_s = time.monotonic() - t0
        # Standbys follow the changelog while the workers grade; give them a moment to reach its end.
        time.sleep(5)
        wait_settled(pair, bootstrap)
        _state, members = group_assignment(bootstrap, env["GRADEFLOW_APP_ID"])
        taken = members[pair.other.env["GRADEFLOW_KAFKA_CLIENT_ID"]][transactions]
        probes: dict[str, int] = {}  # one customer on every partition the stopped worker owns
        for i in range(n):
            c = f"c{i:08d}"
            p = (murmur2(c.encode()) & 0x7FFFFFFF) % partitions  # where this tool's producer puts it
            if p in taken and p not in probes.values():
                probes[c] = p
            if len(probes) == len(taken):
                break
        causes = {f"probe-{c}": c for c in probes}
        watcher = ChangeWatcher(bootstrap, env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env)
        stopped_at = time.time()
        pair.other.stop(signal.SIGTERM if how == "term" else signal.SIGKILL, timeout=120)
        # A second purchase of 50,000 takes a customer from B to A: a change only their state explains.
        produce(bootstrap, transactions, (
            (c.encode(), orjson.dumps({"event_id": e, "customer_id": c, "occurred_at": "2026-01-02T10:00:00+08:00",
                                       "type": "purchase", "amount": "50000", "currency": "CNY"}))
            for e, c in causes.items()))
        found = watcher.wait_for(set(causes), timeout_s=1800)
        watcher.close()
    finally:
        pair.stop()
    text = pair.survivor.log_path.read_text(errors="replace") if pair.survivor.log_path else ""
    seen = log_events_after(text, stopped_at - 0.5)
    taken_over, own = replayed_after(text, stopped_at - 0.5, changelog, taken)
    lost = sorted(causes[e] for e, (_at, doc) in found.items() if doc["previous_grade"] is None)
    return {
        "store": store, "standby": standby, "customers": n, "stop": how, "load_s": round(load_s, 1),
        "session_timeout_s": session_timeout_s, "partitions_taken": ",".join(map(str, sorted(taken))),
        "failover_s": round(max(at for at, _doc in found.values()) - stopped_at, 1),
        "rebalance_at_s": round(seen.get("rebalance", float("nan")) - stopped_at, 1),
        "recovered_at_s": round(seen.get("recovered", float("nan")) - stopped_at, 1),
        "replayed_taken_over": taken_over, "replayed_own": own,
        "state_lost": ",".join(lost) or "none",  # a probe graded as a new customer
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--stores", default="memory://,rocksdb://")
    parser.add_argument("--failover", action="store_true", help="two workers, one stopped: time to take over")
    parser.add_argument("--standbys", default="0,1", help="with --failover: GRADEFLOW_STANDBY_REPLICAS values")
    parser.add_argument("--stops", default="term,kill", help="with --failover: term (graceful), kill (crash)")
    parser.add_argument("--session-timeout", type=float, default=10.0, help="with --failover: seconds")
    args = parser.parse_args()
    bootstrap = load_settings().kafka_bootstrap
    if args.failover:
        for store in args.stores.split(","):
            for standby in (int(s) for s in args.standbys.split(",")):
                if standby and store.startswith("memory"):
                    print(f"failover store={store} standby={standby}: skipped (standbys need rocksdb://)", flush=True)
                    continue
                for how in args.stops.split(","):
                    result = measure_failover(store, standby, args.customers, bootstrap, args.session_timeout, how)
                    print("failover " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        return 0
    for store in args.stores.split(","):
        timings = measure(store, args.customers, bootstrap)
        print(f"store={store} customers={args.customers} " + " ".join(f"{k}={v:.1f}" for k, v in timings.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
