"""`make demo`: a worker grades a realistic stream, live; then the console shows the result.

Starts a worker on fresh topics, writes about a year and a half of
transactions and interactions for a few hundred customers (some of them key
customers who then stop buying, or return most of what they bought) to
.local/demo/history.jsonl, produces it with ``gradeflow replay``, and prints
the grade changes and key-customer alerts as the worker emits them. It ends
with the console's address; run in a terminal, the worker stays up for it
until Ctrl-C, otherwise (CI) everything stops.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from streams.tools.local import ROOT, WorkerProcess, consume, free_port, unique_env
from streams.tools.replay import replay
from streams.settings import load_settings

TZ = timezone(timedelta(hours=8))
START = datetime(2025, 6, 1, 9, 0, tzinfo=TZ)
DAYS = 540

RESET, RED, YELLOW, GREEN, DIM, BOLD = "\033[0m", "\033[31m", "\033[33m", "\033[32m", "\033[2m", "\033[1m"


def _paint(color: str, text: str) -> str:
    return f"{color}{text}{RESET}" if sys.stdout.isatty() else text


def build_history(customers: int, seed: int) -> list[tuple[datetime, str, str, dict[str, Any]]]:
    """(time, topic kind, customer, event) for every customer, sorted by event time."""
    rng = random.Random(seed)
    events: list[tuple[datetime, str, str, dict[str, Any]]] = []
    serial = 0

    def add(at: datetime, kind: str, cid: str, doc: dict[str, Any]) -> None:
        nonlocal serial
        serial += 1
        doc = {"event_id": f"demo-{serial}", "customer_id": cid, "occurred_at": at.isoformat(), **doc}
        events.append((at, kind, cid, doc))

    for n in range(customers):
        cid = f"cust-{n:04d}"
        profile = rng.random()
        if profile < 0.08:      # key account: buys weekly, big baskets
            gap, low, high = 7, 3000, 12000
        elif profile < 0.35:    # regular
            gap, low, high = 60, 100, 900
        else:                   # occasional
            gap, low, high = 150, 50, 600
        stop = DAYS
        refund_at = None
        if profile < 0.08:
            fate = rng.random()
            if fate < 0.45:       # stops buying a while before the end
                stop = rng.randint(250, 420)
            elif fate < 0.7:      # returns most of what was bought
                refund_at = rng.randint(300, 500)
        day = rng.randint(0, gap)
        bought = 0
        while day < stop:
            at = START + timedelta(days=day, minutes=rng.randint(0, 600))
            amount = rng.randint(low, high)
            bought += amount
            add(at, "t", cid, {"type": "purchase", "amount": f"{amount}.{rng.randint(0, 99):02d}",
                               "currency": "CNY", "channel": rng.choice(["store", "app", "web"])})
            if refund_at is not None and day >= refund_at:
                add(at + timedelta(days=2), "t", cid, {"type": "refund", "amount": f"{int(bought * 0.7)}.00",
                                                       "currency": "CNY"})
                refund_at = None
                bought = 0
            day += max(1, int(rng.expovariate(1 / gap)))
            if rng.random() < 0.1:
                add(at + timedelta(hours=3), "i", cid, {"type": rng.choice(["call", "visit", "praise", "complaint"])})
        if stop < DAYS:
            # The account manager's quarterly call finds the lapsed customer.
            for later in range(stop + 60, DAYS, 60):
                add(START + timedelta(days=later, hours=2), "i", cid, {"type": "call"})
    events.sort(key=lambda e: e[0])
    return events


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the worker graded everything it was sent."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--rate", type=float, default=1500.0, help="events produced per second")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    settings = load_settings()
    # The history is replayed fast: the event clock lets the key customers who
    # stop buying be downgraded when the history's own time comes.
    env = unique_env("demo", GRADEFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap, GRADEFLOW_CLOCK="event",
                     GRADEFLOW_CLOCK_TICK_S="0.2", GRADEFLOW_WEB_PORT=str(free_port()))
    history = build_history(args.customers, args.seed)
    bad = [b'{"event_id": "broken-1", "customer_id": ', b'{"event_id":"bad-2","customer_id":"cust-0001",'
           b'"occurred_at":"2026-01-01T10:00:00","type":"purchase","amount":"10","currency":"CNY"}']
    print(_paint(BOLD, f"gradeflow demo: {args.customers} customers, {len(history)} events over {DAYS} days "
                       f"of event time, ruleset rfm-5"))
    worker = WorkerProcess(env, name="demo")
    print(_paint(DIM, "starting a worker on fresh topics..."))
    try:
        worker.start()
        print(_paint(DIM, f"worker ready (log: {worker.log_path}); producing at {args.rate:.0f} events/s\n"))
        totals: Counter[str] = Counter()
        grades: dict[str, str] = {}
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(settings.kafka_bootstrap, env, totals, grades, done),
                                   daemon=True)
        watcher.start()
        path = _write_history(history, bad)
        replay(load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()}), path, rate=args.rate,
               progress=sys.stderr.isatty())
        done.set()
        watcher.join()
        distribution = Counter(grades.values())
        report = _audit(env)
        print()
        print(_paint(BOLD, "summary"))
        print(f"  events produced:     {len(history) + len(bad)} ({len(bad)} of them malformed)")
        print(f"  grade changes:       {totals['changes']} ({totals['initial']} initial, {totals['upgrade']} up, "
              f"{totals['downgrade']} down)")
        print(f"  key-customer alerts: {totals['alerts']} downgrades, {totals['at_risk']} at-risk warnings")
        print(f"  dead letters:        {totals['dead']}")
        print("  grades now:          " + "  ".join(f"{g}={distribution.get(g, 0)}" for g in "SABCD"))
        print(f"  audit:               {report.agreeing_customers}/{report.customers} customers and "
              f"{report.agreeing_final}/{report.final_grades} final grades agree with the offline run"
              + ("" if report.ok else " -- FAILED:\n" + report.render()))
        print(f"  history:             {path} (gradeflow replay {path.relative_to(ROOT)})")
        url = f"http://127.0.0.1:{env['GRADEFLOW_WEB_PORT']}/console/"
        print(_paint(BOLD, f"\nconsole: {url}"))
        ok = totals["dead"] == len(bad) and totals["changes"] > 0 and report.ok
        if sys.stdin.isatty():
            print(_paint(DIM, "the worker keeps running for the console; Ctrl-C stops it"))
            while worker.proc is not None and worker.proc.poll() is None:
                time.sleep(1)  # until Ctrl-C (KeyboardInterrupt) or the worker exits
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        worker.stop()
        print(_paint(DIM, "worker stopped"))


def _audit(env: dict[str, str], timeout_s: float = 60.0) -> Any:
    """``gradeflow audit`` of the demo's topics, once the worker's clock has caught up (the audit
    agrees), or its report when time runs out."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.tools.audit import Audit, read_cluster

    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()})
    audit = Audit(compile_ruleset(load(settings.ruleset)), clock=settings.clock)
    deadline = time.monotonic() + timeout_s
    while True:
        report = audit.check(*read_cluster(settings))
        if report.ok or time.monotonic() > deadline:
            return report
        time.sleep(1.0)


def _write_history(history: list[Any], bad: list[bytes]) -> Path:
    """The demo's history as the JSON Lines ``gradeflow replay`` sends (malformed lines a third of the way)."""
    path = ROOT / ".local" / "demo" / "history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for n, (_, _kind, _cid, doc) in enumerate(history):
            if n == len(history) // 3:
                handle.writelines(raw + b"\n" for raw in bad)
            handle.write(orjson.dumps(doc) + b"\n")
    return path


def _cause(cause: dict[str, Any]) -> str:
    return cause["kind"] if cause["event_id"] is None else f"{cause['kind']} {cause['event_id']}"


def _watch(bootstrap: str, env: dict[str, str], totals: Counter[str], grades: dict[str, str],
           done: threading.Event) -> None:
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"], env["GRADEFLOW_TOPIC_DEAD_LETTERS"]]
    while True:
        # Keep reading while producing; once done, stop after 5 quiet seconds.
        for topic, _key, value in consume(bootstrap, topics, idle_s=5.0, timeout_s=3600):
            doc = orjson.loads(value)
            if topic == topics[0]:
                totals["changes"] += 1
                totals[doc["direction"]] += 1
                grades[doc["customer_id"]] = doc["grade"]
                if doc["direction"] != "initial":
                    arrow = _paint(GREEN, "↑") if doc["direction"] == "upgrade" else _paint(YELLOW, "↓")
                    m = doc["metrics"]
                    print(f"{arrow} {doc['as_of'][:10]} {doc['customer_id']} {doc['previous_grade']} → {doc['grade']}"
                          f"  RFM {m['code']}  {m['frequency']} buys, net {m['monetary']} CNY, "
                          f"last buy {m['recency_days']} d ago  ({_cause(doc['cause'])})")
            elif topic == topics[1]:
                totals["at_risk" if doc.get("kind") == "at_risk" else "alerts"] += 1
                print(_paint(RED, f"ALERT [{doc['severity']}] {doc['summary'].split('. ')[0]}."))
            else:
                totals["dead"] += 1
                print(_paint(DIM, f"dead letter: {doc['reason']}: {doc['error'][:90]}"))
        if done.is_set():
            return


if __name__ == "__main__":
    sys.exit(main())
