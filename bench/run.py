"""`make bench`: worker throughput against a raw consumer on the same topic, and memory.

Produces N transactions for M customers to a fresh topic on the local broker,
then, in one run:
- a raw aiokafka consumer reads the topic with ``getmany()`` and no decoding,
  timed from its start to the N-th record;
- gradeflow workers, one per core as deployed (``--workers``), consume the same
  backlog in one group; their throughput is events/s to the last batch's grades
  decided and written (from the workers' own ``gradeflow-stats`` log lines), from
  the first batch taken for one worker, from the group complete for several
  (:func:`steady_rate`; both figures are printed);
- the workers' peak RSS (VmHWM) above as many idle workers' RSS (:func:`idle_rss_kb`), per 100k
  customers;
- with no clock (``--clock off``, the default): the reference job (decode, fold,
  grade, emit, changelog); then a second group grades the same backlog with the event clock
  (``--also-clock``), time-driven re-grading included, printed beside it, and a third with
  ``GRADEFLOW_PROCESSING_GUARANTEE=exactly_once`` and the reference's clock (``--no-exactly-once``
  skips it), printed beside the at-least-once figure;
- latency at a steady offered rate, on a fresh worker with the wall clock.
The last line is machine-readable:
``throughput_ratio=R worker_eps=W raw_eps=X rss_mb_per_100k=Y p99_ms=P`` (the run without a clock),
then ``eos_eps=E eos_vs_alo=Q`` when the exactly-once group ran.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import asyncio
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.compiled import status as compiled_status
from streams.tools.local import WorkerProcess, drop_run, unique_env
from streams.faustext.outbox import MAX_BATCH_BYTES, Outbox
from streams.settings import load_settings
from streams.topics import create_topics

TZ = timezone(timedelta(hours=8))
WARM_UP_S = 2.0  # of the latency run, before the measured events


def generate(n: int, customers: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """N transactions over the past year for ``customers`` customers, ~3% refunds, in event-time order."""
    rng = random.Random(seed)
    start = (datetime.now(TZ) - timedelta(days=366)).replace(hour=0, minute=0, second=0, microsecond=0)
    step = 365 * 86400 / n
    out = []
    for i in range(n):
        cid = f"c{rng.randrange(customers):07d}"
        at = start + timedelta(seconds=i * step)
        refund = rng.random() < 0.03
        doc = {"event_id": f"b{i}", "customer_id": cid, "occurred_at": at.isoformat(),
               "type": "refund" if refund else "purchase",
               "amount": f"{rng.randint(1, 500 if refund else 3000)}.{rng.randint(0, 99):02d}", "currency": "CNY"}
        # A right-sized copy: orjson's output holds a 4 KiB allocation whatever its length, and the
        # 10M events of a 1M-customer growth size took all 24 GB of a 24 GB VM (docs/performance.md, "Memory").
        out.append((cid.encode(), bytes(memoryview(orjson.dumps(doc)))))
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], chunk: int = 100_000) -> float:
    """Seconds to append ``records`` to ``topic``, placed by key as ``producer.send()`` places them.

    Through the worker's own outbox (aiokafka record batches filled directly): a producer sending
    record by record wrote ~10k records/s here, twenty minutes for the 10M events of a 1M-customer
    growth size."""
    async def send_all() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=MAX_BATCH_BYTES)
        await producer.start()
        try:
            for i in range(0, len(records), chunk):
                outbox = Outbox()
                outbox.extend(topic, records[i:i + chunk])
                await (await outbox.send(producer)).acked()
        finally:
            await producer.stop()

    t0 = time.perf_counter()
    asyncio.run(send_all())
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


_STATS = "gradeflow-stats "


def _stats_of(line: str) -> dict | None:
    """The counters of a worker's ``gradeflow-stats`` log line; None for any other line."""
    return orjson.loads(line.split(_STATS, 1)[1]) if _STATS in line else None


def _last_stats(worker: WorkerProcess) -> dict | None:
    assert worker.log_path is not None
    stats = None
    for line in worker.log_path.read_text(errors="replace").splitlines():
        stats = _stats_of(line) or stats
    return stats


def _log_time(line: str) -> float | None:
    """Unix time of a worker log line (Faust stamps local time, to the millisecond)."""
    if not line.startswith("[") or len(line) < 24:
        return None
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
    except ValueError:
        return None


def worker_timeline(log: str) -> tuple[float | None, list[tuple[float, int]]]:
    """From a worker's log: when it last became ready (the end of its last rebalance's
    recovery), and its ``(log time, events consumed)`` samples."""
    ready = None
    samples: list[tuple[float, int]] = []
    for line in log.splitlines():
        stats = _stats_of(line)
        if stats is not None:
            at = _log_time(line)
            if at is not None:
                samples.append((at, stats["consumed"]))
        elif "Recovery]: Worker ready" in line:
            ready = _log_time(line)
    return ready, samples


def steady_rate(timelines: list[tuple[float | None, list[tuple[float, int]]]], end: float) -> float:
    """Events/s of a group from the moment its last member became ready to ``end`` (its last batch).

    Workers started together still join one after another, and the group's first
    seconds (one member alone, then a rebalance and its recovery) are start-up, not
    throughput. Events consumed before that moment are those of each worker's first
    sample at or after it, which counts a few just after it as before it: this
    errs low."""
    start = max(ready for ready, _ in timelines if ready is not None)
    after = 0
    for _, samples in timelines:
        if not samples:
            continue
        before = next((consumed for at, consumed in samples if at >= start), samples[-1][1])
        after += samples[-1][1] - before
    return after / (end - start)


def worker_env(env: dict[str, str], clock: str, **extra: str) -> dict[str, str]:
    """The environment of a bench worker: the run's ``env`` with ``clock`` as GRADEFLOW_CLOCK.

    Explicit, because :func:`streams.tools.local.unique_env` turns the clock off (scripted histories
    lie in the past), and the bench used to copy that env into its own ``os.environ``: a clock
    read back from there was the previous run's "off", whatever the bench said it measured. A
    run's env now reaches only its workers and :func:`settings_of`."""
    return {**env, "GRADEFLOW_CLOCK": clock,
            "GRADEFLOW_DOWNSTREAM": os.environ.get("GRADEFLOW_DOWNSTREAM", "false"), **extra}


def run_worker(env: dict[str, str], n: int, timeout_s: float, workers: int = 1,
               then: Callable[[], Any] | None = None,
               clock: str = "event") -> tuple[float, float, int, int, dict, Any]:
    """Events/s of ``workers`` worker processes (one group) over the backlog, from the first batch and
    from the group complete (:func:`steady_rate`; the same for one worker), their RSS when ready and at
    peak (kB, summed over workers), their summed stats, and what ``then`` returned: it runs after the
    backlog, while the workers (and the state they hold) are still up. ``clock``: their GRADEFLOW_CLOCK."""
    procs = [WorkerProcess(worker_env(env, clock, GRADEFLOW_REPORT_INTERVAL="0.5", GRADEFLOW_LOG_LEVEL="info"),
                           name=f"bench{i + 1}") for i in range(workers)]
    try:
        # Started together, so that the group forms once instead of rebalancing mid-backlog.
        # The RSS at ready is only printed: a worker starts consuming within a second of it, and
        # the memory figure is taken above idle workers instead (idle_rss_kb).
        with ThreadPoolExecutor(len(procs)) as pool:
            ready_kb = sum(pool.map(lambda w: _status_kb(w.start(ready_timeout=120).proc.pid, "VmRSS"), procs))
        deadline = time.monotonic() + timeout_s
        while True:
            every = [_last_stats(w) for w in procs]
            stats = [st for st in every if st]
            if sum(st["consumed"] for st in stats) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers consumed {sum(st['consumed'] for st in stats)} of {n}:\n{procs[0].tail()}")
            time.sleep(0.5)
        peak_kb = sum(_status_kb(w.proc.pid, "VmHWM") for w in procs if w.proc is not None)
        final = [_last_stats(w) for w in procs]
        # Several workers are counted from the group complete (steady_rate); one from its first batch.
        timelines = [worker_timeline(w.log_path.read_text(errors="replace"))
                     for w in procs if w.log_path] if workers > 1 else []
        after = then() if then is not None else None
    finally:
        for worker in procs:
            worker.stop()
    stats = [st for st in final if st]
    total = {k: sum(st[k] for st in stats) for k in ("consumed", "applied", "dead_lettered", "grade_changes", "alerts")}
    # The workers' CPU (every thread) from their first batch to their last: steadier than a rate on a shared VM.
    total["cpu_s"] = sum(st["last_batch_cpu_s"] - st["first_batch_cpu_s"] for st in stats)
    end = max(st["last_batch_at"] for st in stats)
    whole = total["consumed"] / (end - min(st["first_batch_at"] for st in stats))
    steady = steady_rate(timelines, end) if workers > 1 else whole
    return whole, steady, ready_kb, peak_kb, total, after


def settings_of(env: dict[str, str]):  # noqa: ANN201 - Settings
    """The settings a worker started with ``env`` (GRADEFLOW_ variables) reads, without touching
    ``os.environ``."""
    return load_settings(**{k.removeprefix("GRADEFLOW_").lower(): v for k, v in env.items()})


def idle_rss_kb(settings, clock: str = "off") -> int:  # noqa: ANN001 - Settings
    """RSS (kB) of one worker that is ready and has nothing to consume: the baseline the memory
    figure is taken above, per worker.

    A worker's RSS as it reports ready is no baseline: with a backlog waiting, it starts consuming
    within a second of that line and grows by ~30 MB as it does (fetches, first states); read at
    the line, the figure for the same code spread over 111-176 MB per 100k customers
    (docs/performance.md, "Memory: right-sized bytes and malloc settings"). An idle worker, started the same way on empty topics of its own,
    stays flat from a second after ready."""
    env = unique_env("idle", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap)
    create_topics(settings_of(env))
    worker = WorkerProcess(worker_env(env, clock, GRADEFLOW_REPORT_INTERVAL="0.5", GRADEFLOW_LOG_LEVEL="info"),
                           name="idle")
    try:
        proc = worker.start(ready_timeout=120).proc
        assert proc is not None  # start() returns once the process reported ready
        time.sleep(2)
        return _status_kb(proc.pid, "VmRSS")
    finally:
        worker.stop()
        drop_run(settings.kafka_bootstrap, env)


def _per_100k(baseline_kb: int, peak_kb: int, customers: int) -> float:
    return max(0, peak_kb - baseline_kb) / 1024 / customers * 100_000


def cpu_us_per_event(stats: dict) -> float:
    """Microseconds of the workers' CPU per consumed event, from their first batch to their last."""
    return stats["cpu_s"] / max(1, stats["consumed"]) * 1e6


def _report_group(workers: int, whole_eps: float, worker_eps: float, stats: dict, label: str = "") -> None:
    if workers == 1:
        print(f"gradeflow worker (x1{label}): {worker_eps:,.0f} events/s, {cpu_us_per_event(stats):.1f} µs of "
              f"worker CPU per event; applied={stats['applied']} "
              f"dead={stats['dead_lettered']} grade_changes={stats['grade_changes']} alerts={stats['alerts']}")
    else:
        print(f"gradeflow workers (x{workers}, one group{label}): {worker_eps:,.0f} events/s from the group "
              f"complete, {whole_eps:,.0f} from the first batch (start-up rebalance included), "
              f"{cpu_us_per_event(stats):.1f} µs of worker CPU per event; "
              f"applied={stats['applied']} dead={stats['dead_lettered']} grade_changes={stats['grade_changes']} "
              f"alerts={stats['alerts']}")


def throughput(settings, events: int, customers: int, timeout_s: float, workers: int = 1,
               latency_rate: float = 0, latency_seconds: float = 10, clock: str = "off",
               also_clock: str | None = None, records: list[tuple[bytes, bytes]] | None = None,
               exactly_once: bool = False) -> dict:
    """One throughput run on a fresh topic: raw consumer, then the worker, same records.

    ``clock``: the workers' GRADEFLOW_CLOCK. ``off`` is the reference job a stream processor
    does (decode, fold, grade, emit, changelog); a clock adds time-driven re-grading on top. With
    ``also_clock``, a second group (its own app id, state and outputs) then grades the same topic
    with that clock, and its figures are returned as ``also_*``. With ``exactly_once``, a third group
    grades it with GRADEFLOW_PROCESSING_GUARANTEE=exactly_once and ``clock`` (``eos_*``).
    ``records``: the backlog, if already generated (``generate(events, customers)``).
    With ``latency_rate``, the worker then gets that steady rate of new events for the same
    customers (whose state it now holds) for ``latency_seconds``, and their latency is measured."""
    idle_kb = idle_rss_kb(settings, clock)
    print(f"an idle worker (ready, nothing to consume): {idle_kb / 1024:.0f} MB RSS")
    env = unique_env("bench", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap)
    create_topics(settings_of(env))
    topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"]
    if records is None:
        print(f"generating {events} transactions for {customers} customers...")
        records = generate(events, customers)
    took = produce(settings.kafka_bootstrap, topic, records)
    print(f"produced to {topic} in {took:.1f}s")
    del records
    raw_s = asyncio.run(raw_consume(settings.kafka_bootstrap, topic, events))
    raw_eps = events / raw_s
    print(f"raw aiokafka getmany consumer: {raw_eps:,.0f} events/s ({raw_s:.2f}s)")
    then = None
    if latency_rate:
        def then() -> dict:
            _log_append_time(settings, env)
            sent = asyncio.run(_steady_produce(settings.kafka_bootstrap, topic, latency_rate, latency_seconds,
                                               customers, customer_prefix="c", event_prefix="g"))
            time.sleep(3)
            return _latencies(settings, env, "g", latency_rate, sent)
    also: dict[str, Any] = {}
    try:
        whole_eps, worker_eps, ready_kb, peak_kb, stats, lat = run_worker(env, events, timeout_s, workers, then, clock)
        _report_group(workers, whole_eps, worker_eps, stats, f", clock {clock}")
        per_100k = _per_100k(workers * idle_kb, peak_kb, customers)
        print(f"worker RSS (x{workers}, summed): {ready_kb / 1024:.0f} MB when ready, peak {peak_kb / 1024:.0f} MB; "
              f"{per_100k:.0f} MB per 100k customers above {workers} idle worker(s)")
        if also_clock:
            other = unique_env("bclk", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
                               GRADEFLOW_TOPIC_TRANSACTIONS=topic)
            try:
                create_topics(settings_of(other))
                a_whole, a_eps, a_ready, a_peak, a_stats, _ = run_worker(other, events, timeout_s, workers, None,
                                                                         also_clock)
            finally:
                drop_run(settings.kafka_bootstrap, other)
            _report_group(workers, a_whole, a_eps, a_stats, f", clock {also_clock}")
            a_100k = _per_100k(workers * idle_kb, a_peak, customers)
            also = {"also_clock": also_clock, "also_eps": a_eps, "also_ratio": a_eps / raw_eps,
                    "also_rss_mb_per_100k": a_100k, "also_grade_changes": a_stats["grade_changes"]}
            print(f"with the {also_clock} clock (time-driven re-grading too): {a_eps:,.0f} events/s, "
                  f"ratio {a_eps / raw_eps:.4f}, {a_100k:.0f} MB per 100k customers above idle")
        if exactly_once:
            # The reference job again, with a transaction per input partition and batch
            # (streams/faustext/transactions.py): what exactly-once costs.
            eos = unique_env("beos", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
                             GRADEFLOW_TOPIC_TRANSACTIONS=topic, GRADEFLOW_PROCESSING_GUARANTEE="exactly_once")
            try:
                create_topics(settings_of(eos))
                e_whole, e_eps, _e_ready, _e_peak, e_stats, _ = run_worker(eos, events, timeout_s, workers, None, clock)
            finally:
                drop_run(settings.kafka_bootstrap, eos)
            _report_group(workers, e_whole, e_eps, e_stats, f", clock {clock}, exactly once")
            also.update({"eos_eps": e_eps, "eos_vs_alo": e_eps / worker_eps,
                         "eos_grade_changes": e_stats["grade_changes"]})
            print(f"exactly once: {e_eps:,.0f} events/s against {worker_eps:,.0f} at least once "
                  f"({100 * e_eps / worker_eps:.0f}%)")
    finally:
        drop_run(settings.kafka_bootstrap, env)
    return {"customers": customers, "events": events, "workers": workers, "raw_eps": raw_eps, "worker_eps": worker_eps,
            "ratio": worker_eps / raw_eps, "grade_changes": stats["grade_changes"], "rss_mb_per_100k": per_100k,
            "cpu_us_per_event": cpu_us_per_event(stats),
            "peak_mb": peak_kb / 1024, "idle_mb": idle_kb / 1024, "ready_mb": ready_kb / 1024, "clock": clock,
            **also, **(lat or {})}


async def _steady_produce(bootstrap: str, topic: str, rate: float, seconds: float, customers: int,
                          customer_prefix: str = "l", event_prefix: str = "l") -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    rng = random.Random(5)
    sent = 0
    t0 = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            batch = []
            while sent < due:
                cid = f"{customer_prefix}{rng.randrange(customers):07d}"
                doc = {"event_id": f"{event_prefix}{sent}", "customer_id": cid,
                       "occurred_at": datetime.now(TZ).isoformat(), "type": "purchase",
                       "amount": f"{rng.randint(1, 3000)}.00", "currency": "CNY"}
                batch.append(await producer.send(topic, orjson.dumps(doc), key=cid.encode()))
                sent += 1
            await asyncio.sleep(0.002)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def _read_all(bootstrap: str, topic: str) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[Any] = []
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=2000, max_records=10000)
            if not batches:
                return out
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()


def _log_append_time(settings, env: dict[str, str]) -> None:
    """Input and grade-change topics stamp records with the broker's clock at append from now on."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","))
    # alter_configs replaces a topic's whole dynamic config: restate the cleanup policies.
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, env[name], configs={
        "message.timestamp.type": "LogAppendTime",
        "cleanup.policy": "compact" if name.endswith("CHANGES") else "delete"})
        for name in ("GRADEFLOW_TOPIC_TRANSACTIONS", "GRADEFLOW_TOPIC_GRADE_CHANGES")])
    admin.close()


def _latencies(settings, env: dict[str, str], event_prefix: str, rate: float, sent: int) -> dict:
    """p50/p99/max (ms) from the append of each input event whose id starts with ``event_prefix``
    to the append of the grade changes it caused."""
    inputs = asyncio.run(_read_all(settings.kafka_bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"]))
    appended = {}
    for r in inputs:
        event_id = orjson.loads(r.value)["event_id"]
        if event_id.startswith(event_prefix):
            appended[event_id] = r.timestamp
    changes = asyncio.run(_read_all(settings.kafka_bootstrap, env["GRADEFLOW_TOPIC_GRADE_CHANGES"]))
    lat = []
    for r in changes:
        cause = orjson.loads(r.value)["cause"]["event_id"]
        if cause in appended:
            lat.append(r.timestamp - appended[cause])
    lat.sort()
    if not lat:
        raise RuntimeError("no grade changes arrived for the latency run's events")
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"latency at {rate:.0f} events/s offered ({sent} events, {len(lat)} grade changes): "
          f"p50={p50} ms p99={p99} ms max={lat[-1]} ms")
    return {"p50_ms": p50, "p99_ms": p99, "max_ms": lat[-1], "changes": len(lat)}


def latency(settings, rate: float, seconds: float, customers: int, clock: str = "wall") -> dict:
    """p50/p99 from an input record's append to its grade change's append, at a steady offered rate.

    Both topics use LogAppendTime, so both timestamps come from the broker's
    clock at append: producer batching and consumer polling are inside the figure.
    """
    env = unique_env("lat", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap)
    worker = WorkerProcess(worker_env(env, clock), name="latency")
    try:  # whatever fails, the run's topics go (drop_run below)
        create_topics(settings_of(env))
        _log_append_time(settings, env)
        try:
            worker.start(ready_timeout=120)
            time.sleep(3)  # partitions assigned
            # A warm-up at the same rate, on other customers and not measured: a worker's first
            # batches pay once for metadata of the output topics and first connections (a stall of
            # ~150 ms, enough to move the p99 of a 20 s run), which a running worker does not.
            asyncio.run(_steady_produce(settings.kafka_bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
                                        rate, WARM_UP_S, customers, customer_prefix="w", event_prefix="w"))
            sent = asyncio.run(_steady_produce(settings.kafka_bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
                                               rate, seconds, customers))
            time.sleep(3)
        finally:
            worker.stop()
        try:
            return _latencies(settings, env, "l", rate, sent)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{worker.tail()}") from None
    finally:
        drop_run(settings.kafka_bootstrap, env)


def growth(settings, sizes: list[int], per_customer: int, timeout_s: float, plot: str,
           rate: float = 5000, latency_seconds: float = 10, min_events: int = 0, clock: str = "off",
           workers: int = 1, repeat: int = 1, repeat_max_events: int | None = None) -> None:
    """Throughput, memory and latency at several customer counts; a table, a PNG plot and the
    rows as JSON beside it (``--replot`` draws the plot again from them).

    Each size is the headline run scaled: ``per_customer`` events per customer (the headline's
    500,000 for 50,000 is 10), so that every size has the same history per customer and so the
    same share of events that change a grade (a grade change costs about three events that change
    nothing: sizes with different histories per customer are not comparable). ``min_events``
    raises a size's events, for a quick look at sizes too small to time.
    Latency is measured on the workers that have just graded the backlog, so they hold every
    customer's state: ``rate`` events/s for ``latency_seconds`` to those same customers.

    Every size runs ``repeat`` times (a size of more than ``repeat_max_events`` events once), in
    rounds: each round runs every size, the order turned by one each round, so that no size gets
    only the VM's quiet or busy stretch (on a shared VM the same code moved by 17% between two
    runs of the 1M size, and the 10k size's three runs back to back spanned 14,558-21,818
    events/s). A size's row is :func:`median_run` of its runs (every run's rate kept in
    ``runs_eps``)."""
    runs: dict[int, list[dict]] = {m: [] for m in sizes}
    counts = {m: max(m * per_customer, min_events) for m in sizes}
    # Generated once per size and kept for its later rounds (each round still produces them to a
    # fresh topic): 10M events take a minute to generate and ~3 GB to hold.
    backlogs: dict[int, list[tuple[bytes, bytes]]] = {}
    for r in range(repeat):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        for m in order:
            if r and repeat_max_events is not None and counts[m] > repeat_max_events:
                continue
            print(f"growth: round {r + 1} of {repeat}, {m:,} customers")
            if m not in backlogs:
                print(f"generating {counts[m]} transactions for {m} customers...")
                backlogs[m] = generate(counts[m], m)
            runs[m].append(throughput(settings, counts[m], m, timeout_s, workers, latency_rate=rate,
                                      latency_seconds=latency_seconds, clock=clock, records=backlogs[m]))
            if r == repeat - 1 or (repeat_max_events is not None and counts[m] > repeat_max_events):
                del backlogs[m]  # its last round
    rows = [median_run(runs[m]) for m in sizes]
    with open(os.path.splitext(plot)[0] + ".json", "wb") as fh:
        fh.write(orjson.dumps({"rate": rate, "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "rows": rows},
                              option=orjson.OPT_INDENT_2))
    draw(rows, plot, rate)


_LATENCY = ("p50_ms", "p99_ms", "max_ms")


def median_run(runs: list[dict]) -> dict:
    """The run with the median events/s (the upper one of an even count), with every run's rate,
    in order, as ``runs_eps``. Latency is measured apart from throughput, so each latency figure
    is the median of the runs' own (every run's p99 as ``runs_p99_ms``): the median-rate run's
    p99 alone was once 797 ms where the other two runs of its size gave 73 and 35."""
    median = sorted(runs, key=lambda r: r["worker_eps"])[len(runs) // 2]
    row = {**median, "runs_eps": [r["worker_eps"] for r in runs]}
    for name in _LATENCY:
        values = [r[name] for r in runs if r.get(name) is not None]
        if values:
            row[name] = statistics.median_high(values)
    if any(r.get("p99_ms") is not None for r in runs):
        row["runs_p99_ms"] = [r.get("p99_ms") for r in runs]
    cpu = [r["cpu_us_per_event"] for r in runs if r.get("cpu_us_per_event") is not None]
    if cpu:  # as latency: the median of the runs' own (rows saved before it was measured have none)
        row["cpu_us_per_event"] = statistics.median_high(cpu)
        row["runs_cpu_us_per_event"] = cpu
    return row


def draw(rows: list[dict], plot: str, rate: float, date: str | None = None) -> None:
    """The growth table (printed) and plot (PNG) of ``rows``."""
    print(f"\n| customers | events | events changing a grade | worker events/s | worker CPU µs per event | "
          f"raw events/s | ratio | RSS MB per 100k | p50 / p99 ms at {rate:,.0f}/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        changed = f"{r['grade_changes'] / r['events']:.0%}" if "grade_changes" in r else "?"
        runs = r.get("runs_eps", [])
        eps = f"{r['worker_eps']:,.0f}" + (f" (median of {', '.join(f'{x:,.0f}' for x in runs)})" if len(runs) > 1 else "")
        cpu_runs = r.get("runs_cpu_us_per_event", [])
        cpu = (f"{r['cpu_us_per_event']:.1f}" if r.get("cpu_us_per_event") is not None else "?") + (
            f" (median of {', '.join(f'{x:.1f}' for x in cpu_runs)})" if len(cpu_runs) > 1 else "")
        print(f"| {r['customers']:,} | {r['events']:,} | {changed} | {eps} | {cpu} | {r['raw_eps']:,.0f} | "
              f"{r['ratio']:.3f} | {r['rss_mb_per_100k']:.0f} | {r['p50_ms']} / {r['p99_ms']}"
              + (f" (p99 median of {', '.join(map(str, r['runs_p99_ms']))})" if len(r.get("runs_p99_ms", [])) > 1 else "")
              + " |")
    spread = max(r["worker_eps"] for r in rows) / min(r["worker_eps"] for r in rows) - 1
    below = 1 - min(r["worker_eps"] for r in rows) / max(r["worker_eps"] for r in rows)
    print(f"throughput spread across sizes: {spread:.0%} (the slowest size {below:.1%} below the fastest)")
    cpus = [r["cpu_us_per_event"] for r in rows if r.get("cpu_us_per_event") is not None]
    if len(cpus) == len(rows):
        print(f"worker CPU per event across sizes: {min(cpus):.1f} to {max(cpus):.1f} µs "
              f"(the cheapest size's events/s at the dearest's CPU: {1 - min(cpus) / max(cpus):.1%} lower)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    customers = [r["customers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(customers, [r["worker_eps"] for r in rows], marker="o", color="tab:blue", label="worker events/s")
    ax.set_xscale("log")
    ax.set_xlabel("customers")
    ax.set_ylabel("events/s (backlog)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    lat = ax.twinx()
    lat.plot(customers, [r["p50_ms"] for r in rows], marker="s", color="tab:orange", label=f"p50 ms at {rate:,.0f}/s")
    lat.plot(customers, [r["p99_ms"] for r in rows], marker="^", color="tab:red", label=f"p99 ms at {rate:,.0f}/s")
    lat.set_ylabel("latency, ms (append to append)")
    lat.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = lat.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", fontsize=8)
    ax.set_title(f"gradeflow: throughput and latency vs customers ({date or f'{datetime.now(timezone.utc):%Y-%m-%d}'})")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"plot written to {plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--rate", type=float, default=5000, help="offered rate of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument("--growth", default="", help="comma-separated customer counts, e.g. 10000,100000,1000000")
    parser.add_argument("--per-customer", type=int, default=10,
                        help="events per customer in growth runs (the headline's 500,000 for 50,000)")
    parser.add_argument("--min-events", type=int, default=0, help="fewest events of a growth run's size")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each growth size, in rounds (the median is the row); five because "
                             "one size's runs move by a third on a shared VM (docs/performance.md, Measuring on a shared VM)")
    parser.add_argument("--repeat-max-events", type=int, default=None,
                        help="a growth size of more events runs once (default: every size repeats)")
    parser.add_argument("--replot", default="", help="draw the growth table and plot again from a growth JSON")
    parser.add_argument("--plot", default="docs/bench-growth.png")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes in the throughput run (one group); default: one per core, "
                             "at most one per partition")
    parser.add_argument("--clock", default="off", choices=("event", "wall", "off"),
                        help="GRADEFLOW_CLOCK of the backlog run that gives the ratio: off (the default) is the "
                             "reference job (decode, fold, grade, emit, changelog), without time-driven re-grading")
    parser.add_argument("--also-clock", default="event", choices=("event", "wall", "off", "none"),
                        help="then a second group grades the same backlog with this clock (default event: a "
                             "replay re-graded by the history's own time, all of gradeflow's work); none: skip")
    parser.add_argument("--no-exactly-once", action="store_true",
                        help="skip the third group, which grades the same backlog with "
                             "GRADEFLOW_PROCESSING_GUARANTEE=exactly_once")
    parser.add_argument("--latency-clock", default="wall", choices=("event", "wall", "off"),
                        help="GRADEFLOW_CLOCK of the latency run's worker (new events, so wall as in production)")
    parser.add_argument("--latency-only", action="store_true", help="only the latency run (prints p50/p99, no last line)")
    args = parser.parse_args(argv)

    settings = load_settings()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"date {datetime.now(timezone.utc):%Y-%m-%d}; hot path {compiled_status()}")
    if args.replot:
        with open(args.replot, "rb") as fh:
            saved = orjson.loads(fh.read())
        draw(saved["rows"], args.plot, saved["rate"], saved.get("date"))
        return 0
    if args.growth:
        # One worker unless told: a group of two takes seconds to form (join, rebalance, recovery),
        # longer than the smallest size's whole backlog (100,000 events).
        growth(settings, [int(x) for x in args.growth.split(",")], args.per_customer, args.timeout, args.plot,
               args.rate, min(args.latency_seconds, 10), args.min_events, args.clock, args.workers or 1,
               args.repeat, args.repeat_max_events)
        return 0
    if args.latency_only:
        latency(settings, args.rate, args.latency_seconds, args.customers, args.latency_clock)
        return 0
    workers = args.workers or max(1, min(os.cpu_count() or 1, settings.partitions))
    also = None if args.also_clock == "none" else args.also_clock
    print(f"clock: {args.clock} in the backlog run{f' (then {also})' if also else ''}, "
          f"{args.latency_clock} in the latency run")
    run = throughput(settings, args.events, args.customers, args.timeout, workers, clock=args.clock,
                     also_clock=also, exactly_once=not args.no_exactly_once)
    lat = latency(settings, args.rate, args.latency_seconds, args.customers, args.latency_clock)
    eos = f" eos_eps={run['eos_eps']:.0f} eos_vs_alo={run['eos_vs_alo']:.3f}" if "eos_eps" in run else ""
    print(f"throughput_ratio={run['ratio']:.4f} worker_eps={run['worker_eps']:.0f} raw_eps={run['raw_eps']:.0f} "
          f"rss_mb_per_100k={run['rss_mb_per_100k']:.1f} p99_ms={lat['p99_ms']}{eos}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
