"""A worker with a shadow ruleset on the real broker: the live blast radius (CLI and HTTP) equals the
offline one of the same history, and no shadow grade reaches grade-changes, alerts or Redis."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import orjson
import pytest
import redis

from rules.diff import without_detail
from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.settings import load_settings
from streams.shadow_diff import live_diff, read_records
from streams.tools.cli import main
from streams.tools.local import consume, produce, unique_env
from streams.tools.rules_tools import diff_offline
from tests.rules.shadowhelp import RFM5
from tests.streams.downstream.test_web import get
from tests.streams.downstream_helpers import delete_prefix, free_port, wait_until
from tests.streams.shadowhelp import history, write_history

pytestmark = pytest.mark.slow
REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "shadow-token-for-tests"
RS = compile_ruleset(load("rfm-5"))


def settings_of(env: dict[str, str]) -> Any:
    return load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items() if k.startswith("GRADEFLOW_")})


def test_live_diff_equals_offline_and_shadow_grades_stay_in_their_topic(worker_factory, bootstrap, tmp_path,
                                                                         monkeypatch):
    cand_file = tmp_path / "candidate.yaml"
    # R5 within 3 days (time moves it apart from rfm-5), A from 11 (key customers downgraded)
    cand_file.write_text(RFM5.replace('version: "1"', 'version: "2"').replace("- {max: 7, score: 5}", "- {max: 3, score: 5}")
                         .replace("- {min: 10, grade: A}", "- {min: 11, grade: A}"), encoding="utf-8")
    cand = compile_ruleset(load(cand_file))
    docs = history()
    events = write_history(tmp_path / "history.jsonl", docs)
    offline = diff_offline(RS, cand, events)
    assert offline["differing"] > 0 and offline["alerts"]  # the history exercises what is compared

    # One partition: the event clock's time is then the history's end, the instant offline grades are as of.
    env = unique_env("shadow", GRADEFLOW_CLOCK="event", GRADEFLOW_CLOCK_TICK_S="0.2", GRADEFLOW_PARTITIONS="1",
                     GRADEFLOW_AT_RISK_HORIZON_DAYS="0", GRADEFLOW_SHADOW_RULESETS=str(cand_file),
                     GRADEFLOW_API_TOKEN=TOKEN, GRADEFLOW_WEB_PORT=str(free_port()), GRADEFLOW_RULESET="rfm-5")
    prefix = env["GRADEFLOW_APP_ID"]
    try:
        worker = worker_factory(env=env)
        port = int(env["GRADEFLOW_WEB_PORT"])
        produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"],
                [(str(d["customer_id"]).encode(), orjson.dumps(d)) for d in docs], env)
        settings = settings_of({**env, "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap})

        def caught_up() -> dict[str, Any] | None:
            try:
                live = live_diff(read_records(settings), RS, cand)
            except Exception:  # noqa: BLE001 - the topic may not be there yet
                return None
            return live if without_detail(live) == without_detail(offline) else None

        live = wait_until(caught_up, timeout=120, interval=1.0,
                          what=f"the live diff to equal the offline one\n{worker.tail()}")

        # The CLI and the worker's HTTP API give that same answer.
        for key, value in {**env, "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap}.items():
            monkeypatch.setenv(key, value)
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["rules", "diff", str(cand_file), "--json"]) == 0
        assert json.loads(out.getvalue()) == live
        status, body, _ = get(port, "/rules/diff", token=None)
        assert status == 401
        status, body, _ = get(port, "/rules/diff", token=TOKEN)
        assert status == 200, body
        assert orjson.loads(body) == live
        assert get(port, "/rules/diff?candidate=rfm-5@9", token=TOKEN)[0] == 400

        # The metric counts the customers that differ (one worker: all of them).
        status, body, _ = get(port, "/metrics", token=TOKEN)
        found = re.search(rb'gradeflow_shadow_differing_customers\{ruleset="rfm-5@2"\} (\d+)', body)
        assert found is not None and int(found.group(1)) == live["differing"]

        # No shadow grade anywhere else: every change and alert is the active ruleset's, and Redis
        # holds the active grades the shadow records name.
        topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"]]
        out_records = list(consume(bootstrap, topics, idle_s=3.0, env=env))
        changes = [orjson.loads(v) for t, _k, v in out_records if t == topics[0]]
        alerts = [orjson.loads(v) for t, _k, v in out_records if t == topics[1]]
        assert changes and all(c["ruleset"] == {"id": "rfm-5", "version": "1"} for c in changes)
        ids = {c["event_id"] for c in changes}
        assert alerts and all(a["grade_change_event_id"] in ids for a in alerts)
        final: dict[str, str] = {}
        for c in changes:
            final[c["customer_id"]] = c["grade"]
        records = read_records(settings)
        assert {cid: doc["grades"]["value"] for cid, doc in records.items()} == final
        client = redis.Redis.from_url(REDIS_URL)

        def redis_done() -> bool:
            got = {}
            for cid in final:
                raw = client.hget(f"{prefix}:customer:{cid}", "value")
                if raw is not None:
                    got[cid] = orjson.loads(raw)
            return len(got) == len(final) and all(
                v["grade"] == final[c] and v["ruleset"] == {"id": "rfm-5", "version": "1"} for c, v in got.items())

        wait_until(redis_done, timeout=60, what="Redis holding the active grades")
    finally:
        delete_prefix(prefix, REDIS_URL)

