"""History end to end: a worker grades a generated history; ``GET /customers/{id}/history`` and ``gradeflow explain
--at`` (a subprocess) name the change in effect at several instants, as an offline run of the same events says."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import datetime, timedelta

import orjson

from rules.engine import compile_ruleset
from rules.ruleset import load
from schemas.api import CustomerHistory
from streams.processor import TRANSACTIONS, Record
from streams.tools.explain import explain
from streams.tools.local import ROOT, produce
from streams.tools.rules_tools import run
from tests.streams.downstream.test_web import get
from tests.streams.downstream_helpers import delete_prefix, free_port, wait_until
from tests.streams.test_end_to_end import txn

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "history-token-for-tests"
KEEP = 4  # GRADEFLOW_HISTORY_MAX_CHANGES of the worker: some customers have more changes than that


def generated() -> list[tuple[bytes | None, bytes | None]]:
    """Five customers' purchases and refunds over about a year, each customer's in time order."""
    rng = random.Random(20261206)
    records: list[tuple[bytes | None, bytes | None]] = []
    clocks = {f"h{n}": datetime.fromisoformat("2025-03-01T09:00:00+08:00") for n in range(5)}
    for i in range(150):
        customer = rng.choice(sorted(clocks))
        clocks[customer] += timedelta(days=rng.choice([0, 1, 2, 5, 12, 20]), minutes=rng.randrange(600))
        refund = rng.random() < 0.2
        amount = f"{rng.choice([50, 400, 2500, 9000, 30000])}.00"
        records.append(txn(f"{customer}-{i}", customer, clocks[customer].isoformat(), amount,
                           kind="refund" if refund else "purchase"))
    return records


def answer(changes: list[dict], t: datetime) -> tuple[str | None, str | None, bool]:
    """From every change of the offline run, what the bounded history (the latest KEEP) answers at ``t``:
    the event id of the change in effect (None if none, or dropped), of the next change kept, and
    whether the grade at ``t`` is known."""
    before = [c for c in changes if datetime.fromisoformat(c["as_of"]) <= t]
    current = before[-1] if before else None
    kept = changes[-KEEP:]
    known = current in kept if current is not None else len(changes) <= KEEP  # none yet, if the first is kept
    following = next((c["event_id"] for c in kept if datetime.fromisoformat(c["as_of"]) > t), None)
    return (current["event_id"] if current is not None and known else None, following, known)


def test_history_and_explain_name_the_change_in_effect(worker_factory, bootstrap):
    port = free_port()
    worker = worker_factory(GRADEFLOW_API_TOKEN=TOKEN, GRADEFLOW_WEB_PORT=str(port),
                            GRADEFLOW_HISTORY_MAX_CHANGES=str(KEEP))
    env = worker.env
    try:
        records = generated()
        produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], records)
        offline = run(compile_ruleset(load("rfm-5")),
                      [Record(TRANSACTIONS, "transactions", 0, n, key, value) for n, (key, value) in enumerate(records)])
        by_customer: dict[str, list[dict]] = {}
        for change in offline.changes:
            by_customer.setdefault(change["customer_id"], []).append(change)
        assert len(by_customer) == 5 and max(len(v) for v in by_customer.values()) > KEEP

        def fetched(customer: str) -> dict | None:
            status, body, _ = get(port, f"/customers/{customer}/history", token=TOKEN)
            return orjson.loads(body) if status == 200 else None

        def all_written() -> bool:
            for customer, changes in by_customer.items():
                doc = fetched(customer)
                if doc is None or [c["event_id"] for c in doc["ladders"]["value"]["changes"]] != \
                        [c["event_id"] for c in changes[-KEEP:]]:
                    return False
            return True

        wait_until(all_written, timeout=120, what=f"every history in Redis\n{worker.tail()}")
        assert get(port, "/customers/h0/history", token=None)[0] == 401
        assert get(port, "/customers/nobody/history", token=TOKEN)[0] == 404
        assert get(port, "/customers/h0/history?since=2025-03-01T00:00:00", token=TOKEN)[0] == 400

        checked = 0
        for customer, changes in by_customer.items():
            doc = fetched(customer)
            assert doc is not None
            CustomerHistory.model_validate(doc)
            kept = doc["ladders"]["value"]
            assert kept["complete"] == (len(changes) <= KEEP)
            for got, want in zip(kept["changes"], changes[-KEEP:]):
                assert {k: got[k] for k in ("grade", "previous_grade", "as_of", "cause", "ruleset", "metrics",
                                            "reasons")} == {k: want[k] for k in ("grade", "previous_grade", "as_of",
                                                                                  "cause", "ruleset", "metrics",
                                                                                  "reasons")}
            # Instants: at each change, a second before it, a day after it, before everything.
            for change in changes:
                t = datetime.fromisoformat(change["as_of"])
                for instant in (t, t - timedelta(seconds=1), t + timedelta(days=1)):
                    part = explain(doc, instant)["ladders"]["value"]
                    current = part["set_by"]["event_id"] if part["set_by"] else None
                    following = part["next"]["event_id"] if part["next"] else None
                    assert (current, following, part["known"]) == answer(changes, instant), (customer, instant)
                    checked += 1
            window = orjson.loads(get(port, f"/customers/{customer}/history?limit=2&until="
                                        f"{changes[-1]['as_of'].replace('+', '%2B')}", token=TOKEN)[1])
            assert [c["event_id"] for c in window["ladders"]["value"]["changes"]] == \
                [c["event_id"] for c in changes[-2:]]
        assert checked >= 3 * len(offline.changes)

        # The command line, as an operator runs it: the downgrade of the customer with most changes.
        customer, changes = max(by_customer.items(), key=lambda kv: len(kv[1]))
        down = next(c for c in reversed(changes) if c["direction"] == "downgrade")
        cli_env = {**os.environ, **env, "GRADEFLOW_API_TOKEN": TOKEN}
        out = subprocess.run([sys.executable, "-m", "streams.tools.cli", "explain", "--customer", customer,
                              "--at", down["as_of"], "--api", f"http://127.0.0.1:{port}", "--json"],
                             cwd=ROOT, env=cli_env, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        part = orjson.loads(out.stdout)["ladders"]["value"]
        want_current, want_next, _ = answer(changes, datetime.fromisoformat(down["as_of"]))
        assert part["set_by"]["event_id"] == want_current == down["event_id"]
        assert (part["next"] or {}).get("event_id") == want_next
        assert part["set_by"]["cause"] == down["cause"] and part["set_by"]["ruleset"] == {"id": "rfm-5",
                                                                                         "version": "1"}
        text = subprocess.run([sys.executable, "-m", "streams.tools.cli", "explain", "--customer", customer,
                               "--at", down["as_of"], "--ladder", "value"], cwd=ROOT,
                              env={**cli_env, "GRADEFLOW_WEB_PORT": str(port)}, capture_output=True, timeout=60)
        assert text.returncode == 0, text.stderr.decode()
        lines = text.stdout.decode()
        assert f"ladder value: {down['grade']}\n  set {down['as_of']}: {down['previous_grade']} → {down['grade']} " \
               f"(downgrade), cause transaction (event {down['cause']['event_id']}), ruleset rfm-5@1" in lines
        assert all(f"reason: {r}" in lines for r in down["reasons"])
        assert TOKEN not in lines + text.stderr.decode()
    finally:
        delete_prefix(env["GRADEFLOW_APP_ID"], REDIS_URL)
