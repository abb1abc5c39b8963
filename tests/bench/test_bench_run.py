"""The benchmark (bench/run.py): its reading of worker logs (when a group is complete, its rate from then)
and the environment its workers get."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import orjson

from bench.run import median_run, steady_rate, worker_env, worker_timeline
from streams.tools.local import unique_env


def _at(clock: str) -> float:
    return datetime.strptime(f"2026-11-24 {clock}", "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()  # local, as Faust


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


def test_a_worker_runs_the_clock_the_bench_names_not_the_one_a_run_left_in_its_env() -> None:
    # unique_env turns the clock off for scripted histories; the bench once copied that env into
    # os.environ, and a later run's clock came from there. Whatever the environment holds, the
    # worker runs the clock the bench names.
    env = unique_env("bench")
    assert env["GRADEFLOW_CLOCK"] == "off"
    assert worker_env(env, "event")["GRADEFLOW_CLOCK"] == "event"
    assert worker_env(env, "wall", GRADEFLOW_LOG_LEVEL="info")["GRADEFLOW_LOG_LEVEL"] == "info"
    assert worker_env(env, "off")["GRADEFLOW_APP_ID"] == env["GRADEFLOW_APP_ID"]


def test_a_runs_settings_come_from_its_env_not_from_the_process_environment() -> None:
    import os

    from bench.run import settings_of

    env = unique_env("bclk", GRADEFLOW_TOPIC_TRANSACTIONS="bench-0123abcd-transactions")
    before = dict(os.environ)
    s = settings_of(env)
    assert dict(os.environ) == before
    assert (s.app_id, s.topic_transactions, s.topic_grade_changes, s.clock) == (
        env["GRADEFLOW_APP_ID"], "bench-0123abcd-transactions", env["GRADEFLOW_TOPIC_GRADE_CHANGES"], "off")


def test_a_repeated_growth_size_keeps_its_median_run_and_every_rate() -> None:
    runs = [{"worker_eps": 11_100.0, "raw_eps": 1.0}, {"worker_eps": 14_558.0, "raw_eps": 3.0},
            {"worker_eps": 14_485.0, "raw_eps": 2.0}]
    row = median_run(runs)
    assert row["worker_eps"] == 14_485.0 and row["raw_eps"] == 2.0  # the median run's own figures
    assert row["runs_eps"] == [11_100.0, 14_558.0, 14_485.0]  # in the order they ran
    assert median_run(runs[:1]) == {**runs[0], "runs_eps": [11_100.0]}


def test_a_repeated_growth_size_keeps_the_median_of_each_latency_figure() -> None:
    runs = [{"worker_eps": 15_628.0, "p50_ms": 22, "p99_ms": 797, "max_ms": 897},
            {"worker_eps": 14_861.0, "p50_ms": 24, "p99_ms": 73, "max_ms": 102},
            {"worker_eps": 16_830.0, "p50_ms": 9, "p99_ms": 35, "max_ms": 60}]
    row = median_run(runs)
    assert row["worker_eps"] == 15_628.0  # the median rate's run...
    assert (row["p50_ms"], row["p99_ms"], row["max_ms"]) == (22, 73, 102)  # ...but each latency its own median
    assert row["runs_p99_ms"] == [797, 73, 35]


def test_a_repeated_growth_size_keeps_the_median_of_its_runs_cpu_per_event() -> None:
    runs = [{"worker_eps": 50_000.0, "cpu_us_per_event": 16.0}, {"worker_eps": 40_000.0, "cpu_us_per_event": 15.0},
            {"worker_eps": 45_000.0, "cpu_us_per_event": 19.0}]
    row = median_run(runs)
    assert row["worker_eps"] == 45_000.0 and row["cpu_us_per_event"] == 16.0
    assert row["runs_cpu_us_per_event"] == [16.0, 15.0, 19.0]
    assert "cpu_us_per_event" not in median_run([{"worker_eps": 1.0}])  # rows from before it was measured


def test_the_growth_table_shows_rate_and_cpu_per_event_and_how_far_apart_the_sizes_are(tmp_path, capsys) -> None:
    from bench.run import draw

    rows = [{"customers": 10_000, "events": 100_000, "grade_changes": 25_000, "worker_eps": 50_000.0,
             "runs_eps": [50_000.0, 48_000.0, 52_000.0], "cpu_us_per_event": 16.0, "runs_cpu_us_per_event": [16.0, 15.5, 16.5],
             "raw_eps": 800_000.0, "ratio": 0.0625, "rss_mb_per_100k": 200.0, "p50_ms": 2, "p99_ms": 5},
            {"customers": 1_000_000, "events": 10_000_000, "grade_changes": 2_500_000, "worker_eps": 42_000.0,
             "cpu_us_per_event": 20.0, "raw_eps": 800_000.0, "ratio": 0.0525, "rss_mb_per_100k": 80.0,
             "p50_ms": 2, "p99_ms": 6}]
    draw(cast(list[dict[str, Any]], rows), str(tmp_path / "g.png"), 5000, "2026-12-04")
    out = capsys.readouterr().out
    assert "| 10,000 | 100,000 | 25% | 50,000 (median of 50,000, 48,000, 52,000) | 16.0 (median of 16.0, 15.5, 16.5) |" in out
    assert "| 1,000,000 | 10,000,000 | 25% | 42,000 | 20.0 | 800,000 |" in out
    assert "the slowest size 16.0% below the fastest" in out
    assert "16.0 to 20.0 µs" in out and "20.0% lower" in out
    assert (tmp_path / "g.png").stat().st_size > 0


def test_growth_runs_every_size_in_rounds_turning_the_order(monkeypatch, tmp_path) -> None:
    import bench.run as run

    calls: list[int] = []
    backlogs: dict[int, list[object]] = {}
    generated: list[tuple[int, int]] = []
    real_generate = run.generate

    def counting_generate(n: int, customers: int) -> list[tuple[bytes, bytes]]:
        generated.append((n, customers))
        return real_generate(n, customers)

    def fake_throughput(settings, events, customers, *args, **kwargs) -> dict:
        calls.append(customers)
        backlogs.setdefault(customers, []).append(kwargs["records"])
        return {"customers": customers, "events": events, "worker_eps": float(len(calls)), "raw_eps": 1.0,
                "ratio": 1.0, "rss_mb_per_100k": 1.0}

    drawn: list[list[dict]] = []
    monkeypatch.setattr(run, "throughput", fake_throughput)
    monkeypatch.setattr(run, "generate", counting_generate)
    monkeypatch.setattr(run, "draw", lambda rows, plot, rate: drawn.append(rows))
    plot = str(tmp_path / "g.png")
    run.growth(None, [10, 100, 1000], 10, 60, plot, repeat=3)
    assert calls == [10, 100, 1000, 100, 1000, 10, 1000, 10, 100]  # no size always first or last
    # Each size's backlog is generated once and every round of it grades those same records.
    assert generated == [(100, 10), (1000, 100), (10000, 1000)]
    for customers, given in backlogs.items():
        assert all(records is given[0] for records in given)
        assert given[0] == real_generate(customers * 10, customers)
    rows = drawn[0]
    assert [r["runs_eps"] for r in rows] == [[1.0, 6.0, 8.0], [2.0, 4.0, 9.0], [3.0, 5.0, 7.0]]
    assert [r["worker_eps"] for r in rows] == [6.0, 4.0, 5.0]
    saved = orjson.loads((tmp_path / "g.json").read_bytes())
    assert saved["rows"] == rows

    calls.clear()
    run.growth(None, [10, 1000], 10, 60, plot, repeat=2, repeat_max_events=1000)
    assert calls == [10, 1000, 10]  # 10,000 events: once
