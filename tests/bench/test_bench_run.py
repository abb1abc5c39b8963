"""The benchmark's reading of worker logs (bench/run.py): when a group is complete, and its rate from then."""

from __future__ import annotations

from datetime import datetime

import orjson

from bench.run import steady_rate, worker_timeline


def _at(clock: str) -> float:
    return datetime.strptime(f"2026-11-24 {clock}", "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _stats(clock: str, consumed: int) -> str:
    return f"[2026-11-24 {clock}] [1] [INFO] gradeflow-stats " + orjson.dumps({"consumed": consumed}).decode()


def _ready(clock: str) -> str:
    return f"[2026-11-24 {clock}] [1] [INFO] [^---Recovery]: Worker ready "


def test_the_timeline_is_the_last_ready_and_every_stats_sample() -> None:
    log = "\n".join([_ready("03:21:49,067"), _stats("03:21:49,722", 4000), "| a table line |",
                     "[2026-11-24 03:21:52,057] [1] [WARNING] Heartbeat failed", _ready("03:21:54,184"),
                     _stats("03:21:54,500", 30000)])
    ready, samples = worker_timeline(log)
    assert ready == _at("03:21:54,184")
    assert samples == [(_at("03:21:49,722"), 4000), (_at("03:21:54,500"), 30000)]


def test_the_steady_rate_counts_from_the_last_member_ready() -> None:
    # Worker 1 alone from :00 (30,000 events by :03), then both from :04 to :14.
    one = (_at("03:00:04,000"), [(_at("03:00:03,500"), 30000), (_at("03:00:04,500"), 32000),
                                 (_at("03:00:14,000"), 130000)])
    two = (_at("03:00:03,900"), [(_at("03:00:04,200"), 1000), (_at("03:00:14,000"), 101000)])
    rate = steady_rate([one, two], end=_at("03:00:14,000"))
    # After :04, 98,000 + 100,000 events in 10 s; what each did between :04 and its first sample
    # after it counts as before (errs low).
    assert rate == (130000 - 32000 + 101000 - 1000) / 10
    # A worker that consumed nothing after the group was complete adds nothing.
    idle = (_at("03:00:02,000"), [(_at("03:00:02,500"), 500)])
    assert steady_rate([one, two, idle], end=_at("03:00:14,000")) == rate
