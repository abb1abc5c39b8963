"""`make bench-hot` (bench/hotpath.py): it grades what it says, and --setup-only grades nothing."""

from __future__ import annotations

import gc

import pytest

from bench.hotpath import main
from streams.settings import Settings


def test_the_hot_path_bench_grades_every_event_and_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    before = gc.get_threshold()
    try:
        assert main(["--events", "300", "--customers", "30", "--no-clock"]) == 0
        # The worker's collector setting, not Python's default (700).
        assert gc.get_threshold()[0] == Settings().gc_threshold != 700
    finally:
        gc.set_threshold(*before)
    out = capsys.readouterr().out
    from schemas.compiled import status

    assert out.startswith(f"hot path {status()}: 300 events, 30 customers, rfm-5, clock off, states in the index: ")
    changes = int(out.split(" grade changes")[0].rsplit(" ", 1)[1])
    assert 30 <= changes < 300  # every customer graded at least once; not every event changes a grade


def test_the_states_end_the_same_in_the_index_as_in_a_dict() -> None:
    import zlib

    from bench.hotpath import run
    from bench.run import generate
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.processor import TRANSACTIONS, Record, utcnow

    records = [Record(TRANSACTIONS, "transactions", zlib.crc32(key) % 4, offset, key, value)
               for offset, (key, value) in enumerate(generate(3_000, 200))]
    rs, now = compile_ruleset(load("rfm-5")), utcnow()
    indexed, plain = run(records, rs, 500, now, None), run(records, rs, 500, now, None, plain_dict=True)
    assert indexed == plain and indexed[0] > 200  # the same grade changes and the same bytes of state


def test_setup_only_grades_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    before = gc.get_threshold()
    try:
        assert main(["--events", "300", "--customers", "30", "--setup-only"]) == 0
    finally:
        gc.set_threshold(*before)
    assert capsys.readouterr().out == ""
