"""The benchmark's memory figure (bench/run.py): taken above idle workers, on the real broker."""

from __future__ import annotations

import os

import pytest

from bench.run import throughput
from streams.settings import load_settings


def test_the_memory_figure_is_the_peak_above_an_idle_worker(bootstrap: str) -> None:
    run = throughput(load_settings(kafka_bootstrap=bootstrap), 20_000, 2_000, 120, workers=1)
    assert run["grade_changes"] > 0
    # An idle worker has imported everything and joined its group: tens of MB, not a few.
    assert 30 < run["idle_mb"] < run["peak_mb"]
    assert run["rss_mb_per_100k"] == pytest.approx((run["peak_mb"] - run["idle_mb"]) / 2_000 * 100_000)
    # The worker's CPU over the same window as its rate: some, and no more than its cores could give.
    assert 0 < run["cpu_us_per_event"] <= (os.cpu_count() or 1) * 1e6 / run["worker_eps"]
