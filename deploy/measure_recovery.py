"""Measure how long a worker takes to recover its table, per store, on the local broker.

    python deploy/measure_recovery.py --customers 100000

For each store: grade one purchase for each of N customers with one worker, stop it, then time
a new worker from process start to "tables recovered" (the ready line):
  memory        — the new worker replays the whole changelog into memory;
  rocksdb-warm  — RocksDB, same data dir (a restarted pod with its volume): only the tail;
  rocksdb-cold  — RocksDB, empty data dir (a pod on a new node): the whole changelog, into RocksDB.
A fresh app with no state gives the fixed start-up cost ("baseline"). Numbers go to docs/deploy.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from streams.local import WorkerProcess, produce, unique_env  # noqa: E402
from streams.settings import load_settings  # noqa: E402

READY = re.compile(rb"tables recovered|Recovery\]: Worker ready")
STATS = re.compile(rb"gradeflow-stats (\{.*\})")


def wait_ready(worker: WorkerProcess, timeout: float = 900) -> float:
    """Start ``worker`` and return seconds from process start to its ready line."""
    started = time.monotonic()
    worker.start(ready_timeout=timeout)  # waits for "Ready" (Faust's, may precede recovery)
    while not READY.search(worker.log_path.read_bytes()):
        if time.monotonic() - started > timeout:
            raise TimeoutError(worker.tail())
        time.sleep(0.05)
    return time.monotonic() - started


def wait_consumed(worker: WorkerProcess, n: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = STATS.findall(worker.log_path.read_bytes())
        if found and orjson.loads(found[-1])["consumed"] >= n:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--stores", default="memory://,rocksdb://")
    args = parser.parse_args()
    bootstrap = load_settings().kafka_bootstrap
    for store in args.stores.split(","):
        result = measure(store, args.customers, bootstrap)
        print(f"store={store} customers={args.customers} " + " ".join(f"{k}={v:.1f}" for k, v in result.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
