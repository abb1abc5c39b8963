"""``gradeflow replay``: a history into a real worker's input topics, waiting until it is graded."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from streams.tools.local import ROOT, consume
from streams.tools.replay import route
from tests.streams.test_end_to_end import EXPECTED_CHANGES, history


def test_route_sends_each_line_where_rules_try_reads_it():
    assert route(b'{"customer_id": "a", "type": "purchase", "amount": "1"}') == (False, b"a")
    assert route(b'{"customer_id": "b", "type": "call"}') == (True, b"b")
    assert route(b'{"customer_id": ') == (False, None)
    assert route(b'[1, 2]') == (False, None)


def test_replay_waits_until_the_worker_graded_the_history(worker_factory, bootstrap, tmp_path):
    w = worker_factory()
    path = tmp_path / "history.jsonl"
    lines = [value for _, value in history() if value is not None]
    lines.insert(3, orjson.dumps({"event_id": "i1", "customer_id": "bob", "occurred_at": "2026-01-15T10:00:00+08:00",
                                  "type": "call"}))
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    env = {**os.environ, **w.env, "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap}
    done = subprocess.run([sys.executable, "-m", "streams.tools.cli", "replay", str(path), "--rate", "200", "--wait",
                           "--timeout", "90"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr + w.tail()
    assert f"replayed {len(lines)} events ({len(lines) - 1} to {w.env['GRADEFLOW_TOPIC_TRANSACTIONS']}, 1 to " \
           f"{w.env['GRADEFLOW_TOPIC_INTERACTIONS']})" in done.stdout
    assert "graded: group" in done.stdout
    assert "events/s" in done.stderr or "it/s" in done.stderr or "events]" in done.stderr  # tqdm's rate and ETA
    # Graded means graded: every change the history makes is already on grade-changes.
    want = sum(len(v) for v in EXPECTED_CHANGES.values())
    got = list(consume(bootstrap, [w.env["GRADEFLOW_TOPIC_GRADE_CHANGES"]], until=want, idle_s=5, timeout_s=20))
    assert len(got) == want
