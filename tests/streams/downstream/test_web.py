"""The worker's HTTP API with two real workers: answers, refuses a missing token, matches the tables and Redis."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections import Counter

import orjson
import redis

from tests.streams.downstream_helpers import delete_prefix, free_port, wait_until
from rules.state import CustomerState
from streams.downstream.redis_grades import customer_key
from tests.streams.producerhelp import produce_librdkafka
from streams.downstream.web import authorized
from tests.streams.test_end_to_end import EXPECTED_CHANGES, history

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "s3cret-token-for-tests"


def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_bearer_check():
    assert authorized("Bearer abc", "abc") and authorized("bearer abc", "abc")
    assert not authorized(None, "abc") and not authorized("Bearer abd", "abc") and not authorized("Basic abc", "abc")


def test_http_api_answers_refuses_a_missing_token_and_matches_the_tables(worker_factory, bootstrap):
    w1 = worker_factory(GRADEFLOW_API_TOKEN=TOKEN, GRADEFLOW_WEB_PORT=str(free_port()))
    env = w1.env
    prefix = env["GRADEFLOW_APP_ID"]
    try:
        w2 = worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(free_port())}, name="worker2")
        ports = [int(w1.env["GRADEFLOW_WEB_PORT"]), int(w2.env["GRADEFLOW_WEB_PORT"])]

        # Open routes answer without a token; both workers become ready once the group settled.
        for port in ports:
            status, body, _ = get(port, "/healthz", token=None)
            assert status == 200 and orjson.loads(body)["status"] == "ok"
        wait_until(lambda: all(get(p, "/readyz", token=None)[0] == 200 for p in ports), timeout=60,
                   what="both workers ready")

        # librdkafka's partitioner, not Kafka's Java one: the API finds each state where it lives.
        placed = produce_librdkafka(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history())
        final = {c: changes[-1][1] for c, changes in EXPECTED_CHANGES.items()}
        client = redis.Redis.from_url(REDIS_URL)

        def redis_done():
            got = {c: orjson.loads(v)["grade"] for c in final
                   if (v := client.hget(customer_key(prefix, c), "value")) is not None}
            return got == final

        wait_until(redis_done, timeout=90, what=f"grades in Redis\n{w1.tail()}\n{w2.tail()}")

        # Everything but /healthz and /readyz refuses a missing or wrong token.
        for path in ("/customers/alice", "/grades", "/metrics", "/openapi.json"):
            status, _, headers = get(ports[0], path, token=None)
            assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert get(ports[0], path, token="wrong")[0] == 401

        # The tables, as their changelog holds them (latest value per customer).
        changelog = f"{prefix}-customer-state-changelog"
        latest = _latest_by_key(bootstrap, changelog)

        for customer, grade in final.items():
            answers = []
            for port in ports:
                status, body, _ = get(port, f"/customers/{customer}")
                assert status == 200, body
                answers.append(orjson.loads(body))
            sources = sorted(a["source"] for a in answers)
            assert sources == ["redis", "table"], answers  # one worker owns the partition
            for a in answers:
                assert a["customer_id"] == customer
                assert a["partition"] == (placed[customer.encode()] if a["source"] == "table" else None)
                assert a["grades"]["value"]["grade"] == grade
                assert a["grades"]["value"]["metrics"]["code"]
            from_table = next(a for a in answers if a["source"] == "table")
            from_redis = next(a for a in answers if a["source"] == "redis")
            assert {k: v["grade"] for k, v in from_table["grades"].items()} == \
                   CustomerState.from_bytes(latest[customer.encode()]).grades
            stored = orjson.loads(client.hget(customer_key(prefix, customer), "value"))
            assert from_redis["grades"]["value"]["event_id"] == stored["event_id"]
            assert from_redis["grades"]["value"]["metrics"] == stored["metrics"]
            # The last change's metrics are the table's metrics as of the latest event, when the latest
            # event changed the grade (true for every customer of this history but carol's c2).
            if customer != "carol":
                assert from_table["grades"]["value"]["metrics"]["code"] == stored["metrics"]["code"]

        assert get(ports[0], "/customers/nobody")[0] == 404

        # Counts per ladder, from Redis, the same on both workers.
        for port in ports:
            status, body, _ = get(port, "/grades")
            assert status == 200
            doc = orjson.loads(body)
            assert doc["source"] == "redis"
            assert doc["ladders"]["value"] == {g: Counter(final.values()).get(g, 0) for g in "SABCD"}

        # Metrics: the names operators chart, and the totals of both workers add up.
        consumed = 0
        for port in ports:
            status, body, headers = get(port, "/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            text = body.decode()
            for name in ("gradeflow_events_consumed_total", "gradeflow_events_dead_lettered_total",
                         "gradeflow_events_duplicate_total", "gradeflow_processing_latency_seconds_bucket",
                         "gradeflow_customers_by_grade", "gradeflow_consumer_lag"):
                assert name in text, name
            assert 'gradeflow_customers_by_grade{grade="S",ladder="value"} 1.0' in text
            consumed += sum(float(v) for v in re.findall(r'^gradeflow_events_consumed_total\{[^}]*\} (\S+)$',
                                                            text, re.M))
        assert consumed >= len(history())

        # The OpenAPI description lists every route.
        status, body, _ = get(ports[0], "/openapi.json")
        spec = orjson.loads(body)
        assert spec["openapi"].startswith("3.1")
        assert set(spec["paths"]) == {"/customers/{customer_id}", "/customers/{customer_id}/history", "/grades", "/healthz", "/readyz", "/metrics",
                                      "/rules", "/openapi.json", "/console/", "/api/overview", "/api/alerts", "/api/at-risk",
                                      "/api/customers/{customer_id}/timeline", "/rules/diff"}
        assert "CustomerGrades" in spec["components"]["schemas"]
        client.close()
    finally:
        delete_prefix(prefix, REDIS_URL)


def _latest_by_key(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        out = {}
        for r in consumer:
            if r.value is not None:
                out[r.key] = r.value
        return out
    finally:
        consumer.close()
