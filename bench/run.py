"""`make bench`: worker throughput against a raw consumer on the same topic, and memory.

Produces N transactions for M customers to a fresh topic on the local broker,
then, in one run:
- a raw aiokafka consumer reads the topic with ``getmany()`` and no decoding,
  timed from its start to the N-th record;
- a gradeflow worker consumes the same backlog; its throughput is events/s
  from the first batch taken to the last batch's grades decided and written
  (from the worker's own ``gradeflow-stats`` log lines);
- the worker's peak RSS (VmHWM) above its RSS when ready, per 100k customers.
The last line is machine-readable:
``throughput_ratio=R worker_eps=W raw_eps=X rss_mb_per_100k=Y``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from datetime import datetime, timedelta, timezone

import orjson
from aiokafka import AIOKafkaConsumer
from kafka import KafkaProducer

from streams.local import WorkerProcess, unique_env
from streams.settings import load_settings
from streams.topics import create_topics

TZ = timezone(timedelta(hours=8))


def generate(n: int, customers: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """N transactions over a year for ``customers`` customers, ~3% refunds, in event-time order."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=TZ)
    step = 365 * 86400 / n
    out = []
    for i in range(n):
        cid = f"c{rng.randrange(customers):07d}"
        at = start + timedelta(seconds=i * step)
        refund = rng.random() < 0.03
        doc = {"event_id": f"b{i}", "customer_id": cid, "occurred_at": at.isoformat(),
               "type": "refund" if refund else "purchase",
               "amount": f"{rng.randint(1, 500 if refund else 3000)}.{rng.randint(0, 99):02d}", "currency": "CNY"}
        out.append((cid.encode(), orjson.dumps(doc)))
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    p = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks=1, linger_ms=20, batch_size=512 * 1024,
                      buffer_memory=256 * 1024 * 1024)
    t0 = time.perf_counter()
    for key, value in records:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()
    return time.perf_counter() - t0


async def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    """Seconds for a bare aiokafka consumer to read ``n`` records, without decoding."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    t0 = time.perf_counter()
    await consumer.start()
    seen = 0
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10000)
            for records in batches.values():
                seen += len(records)
    finally:
        elapsed = time.perf_counter() - t0
        await consumer.stop()
    return elapsed


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _last_stats(worker: WorkerProcess) -> dict | None:
    assert worker.log_path is not None
    stats = None
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if "gradeflow-stats " in line:
            stats = orjson.loads(line.split("gradeflow-stats ", 1)[1])
    return stats


def run_worker(env: dict[str, str], n: int, timeout_s: float) -> tuple[float, int, int, dict]:
    """Worker events/s over the backlog, its RSS when ready and its peak RSS (kB)."""
    worker = WorkerProcess({**env, "GRADEFLOW_REPORT_INTERVAL": "0.5", "GRADEFLOW_LOG_LEVEL": "info", "GRADEFLOW_DOWNSTREAM": os.environ.get("GRADEFLOW_DOWNSTREAM", "false")},
                           name="bench")
    worker.start(ready_timeout=120)
    assert worker.proc is not None
    ready_kb = _status_kb(worker.proc.pid, "VmRSS")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            stats = _last_stats(worker)
            if stats and stats["consumed"] >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker consumed {stats and stats['consumed']} of {n}:\n{worker.tail()}")
            time.sleep(0.5)
        peak_kb = _status_kb(worker.proc.pid, "VmHWM")
    finally:
        worker.stop()
    eps = stats["consumed"] / (stats["last_batch_at"] - stats["first_batch_at"])
    return eps, ready_kb, peak_kb, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)

    settings = load_settings()
    env = unique_env("bench", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap)
    os.environ.update(env)
    create_topics(load_settings())
    topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"]

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"date {datetime.now(timezone.utc):%Y-%m-%d}")
    print(f"generating {args.events} transactions for {args.customers} customers...")
    records = generate(args.events, args.customers)
    took = produce(settings.kafka_bootstrap, topic, records)
    print(f"produced to {topic} in {took:.1f}s")
    del records

    raw_s = asyncio.run(raw_consume(settings.kafka_bootstrap, topic, args.events))
    raw_eps = args.events / raw_s
    print(f"raw aiokafka getmany consumer: {raw_eps:,.0f} events/s ({raw_s:.2f}s)")

    worker_eps, ready_kb, peak_kb, stats = run_worker(env, args.events, args.timeout)
    print(f"gradeflow worker: {worker_eps:,.0f} events/s; applied={stats['applied']} dead={stats['dead_lettered']} "
          f"grade_changes={stats['grade_changes']} alerts={stats['alerts']}")
    state_mb = max(0, peak_kb - ready_kb) / 1024
    per_100k = state_mb / args.customers * 100_000
    print(f"worker RSS: {ready_kb / 1024:.0f} MB when ready, peak {peak_kb / 1024:.0f} MB; "
          f"{per_100k:.0f} MB per 100k customers above the ready baseline")
    print(f"throughput_ratio={worker_eps / raw_eps:.4f} worker_eps={worker_eps:.0f} raw_eps={raw_eps:.0f} "
          f"rss_mb_per_100k={per_100k:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
