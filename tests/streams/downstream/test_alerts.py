"""Alerts to on-call, with the real Redis and a local HTTP server standing in for the services.

The payload checks are JSON Schemas written from the services' published formats:
- PagerDuty Events API v2 (``POST https://events.pagerduty.com/v2/enqueue``): ``routing_key``,
  ``event_action`` trigger|acknowledge|resolve, ``dedup_key`` ≤ 255 chars, ``payload`` with required
  ``summary`` (≤ 1024), ``source``, ``severity`` critical|error|warning|info, optional ``timestamp``,
  ``component``, ``group``, ``class``, ``custom_details``; a resolve needs only routing_key,
  event_action and dedup_key.
- Alertmanager API v2 (``POST /api/v2/alerts``): a JSON array of postable alerts, each with
  ``labels`` (string map, ``alertname`` required), ``annotations`` (string map), optional RFC 3339
  ``startsAt`` / ``endsAt``, ``generatorURL``.
- Slack incoming webhooks: a message with ``text`` (required as the notification fallback when
  ``blocks`` are given) and Block Kit ``blocks`` (≤ 50; section text objects mrkdwn|plain_text, ≤ 3000).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone

import jsonschema
import orjson
import pytest
import redis.asyncio as aioredis

from tests.streams.downstream_helpers import StandIn, delete_prefix, free_port, wait_until
from tests.streams.downstream.oncall_helpers import Answer, Scripted
from rules.engine import compile_ruleset
from rules.ruleset import load
from schemas.events import Alert
from streams.downstream.alerts.delivery import Dispatcher
from streams.downstream.alerts.policy import SeverityRule, severity
from streams.tools.local import WorkerProcess, produce
from streams.settings import load_settings

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")

PD_TRIGGER = {
    "type": "object",
    "required": ["routing_key", "event_action", "payload"],
    "additionalProperties": False,
    "properties": {
        "routing_key": {"type": "string", "minLength": 1},
        "event_action": {"const": "trigger"},
        "dedup_key": {"type": "string", "minLength": 1, "maxLength": 255},
        "client": {"type": "string"},
        "client_url": {"type": "string"},
        "links": {"type": "array"},
        "images": {"type": "array"},
        "payload": {
            "type": "object",
            "required": ["summary", "source", "severity"],
            "additionalProperties": False,
            "properties": {
                "summary": {"type": "string", "minLength": 1, "maxLength": 1024},
                "source": {"type": "string", "minLength": 1},
                "severity": {"enum": ["critical", "error", "warning", "info"]},
                "timestamp": {"type": "string"},
                "component": {"type": "string"},
                "group": {"type": "string"},
                "class": {"type": "string"},
                "custom_details": {"type": "object"},
            },
        },
    },
}
PD_RESOLVE = {
    "type": "object",
    "required": ["routing_key", "event_action", "dedup_key"],
    "additionalProperties": False,
    "properties": {
        "routing_key": {"type": "string", "minLength": 1},
        "event_action": {"const": "resolve"},
        "dedup_key": {"type": "string", "minLength": 1, "maxLength": 255},
    },
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
AM_ALERTS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["labels"],
        "additionalProperties": False,
        "properties": {
            "labels": {**_STRING_MAP, "required": ["alertname"],
                       "propertyNames": {"pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
            "annotations": _STRING_MAP,
            "startsAt": {"type": "string"},
            "endsAt": {"type": "string"},
            "generatorURL": {"type": "string"},
        },
    },
}
_TEXT = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"enum": ["mrkdwn", "plain_text"]}, "text": {"type": "string", "maxLength": 3000}}}
SLACK = {
    "type": "object",
    "required": ["text"],
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "blocks": {"type": "array", "maxItems": 50, "items": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["section", "context", "divider", "header"]},
                           "text": _TEXT, "elements": {"type": "array", "items": _TEXT}}}},
    },
}


def rfc3339(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, value
    return moment


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix no other test uses; its keys are deleted afterwards (tests/conftest.py marks users broker)."""
    name = f"test-alerts-{uuid.uuid4().hex[:8]}"
    yield name
    delete_prefix(name, REDIS_URL)


@pytest.fixture
def standin():
    server = StandIn().start()
    yield server
    server.stop()


def settings_for(server: StandIn, **extra):
    return load_settings(
        alert_webhook_url=server.url("/hook"),
        alert_slack_webhook_url=server.url("/slack/T000/B000/XXX"),
        alert_pagerduty_routing_key="R0UT1NGKEY0000000000000000000000",
        alert_pagerduty_url=server.url("/pagerduty/v2/enqueue"),
        alert_alertmanager_url=server.url("/am"),
        alert_attempts=3, alert_backoff_s=0.01, alert_retry_delay_s=0.1, **extra)


def alert_doc(customer: str, previous: str, grade: str, as_of: str = "2026-01-01T10:00:00+08:00") -> dict:
    """An alert as rules/changes.py writes it on grade-alerts."""
    change_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{customer}/{previous}/{grade}/{as_of}"))
    return {
        "schema_version": 1,
        "alert_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "alert/" + change_id)),
        "customer_id": customer,
        "ladder": "value",
        "severity": "critical",
        "summary": f"Customer {customer} is no longer a key customer on ladder 'value': {previous} → {grade}.",
        "previous_grade": previous,
        "grade": grade,
        "grade_change_event_id": change_id,
        "as_of": as_of,
        "dedup_key": f"gradeflow/value/{customer}/key-downgrade",
    }


def upgrade_doc(customer: str, previous: str, grade: str, as_of: str) -> dict:
    return {"event_id": str(uuid.uuid4()), "customer_id": customer, "ladder": "value", "previous_grade": previous,
            "grade": grade, "direction": "upgrade", "as_of": as_of}


class Harness:
    """A Dispatcher on the real Redis whose retry topic is a list (the worker tests use the real topic)."""

    def __init__(self, settings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.retries: list[dict] = []
        self.dead: list[dict] = []

    async def __aenter__(self) -> "Harness":
        self.redis = aioredis.Redis.from_url(REDIS_URL)
        rs = compile_ruleset(load(self.settings.ruleset))

        async def schedule(doc: dict) -> None:
            self.retries.append(doc)

        async def dead_letter(doc: dict) -> None:
            self.dead.append(doc)

        self.dispatcher = Dispatcher(self.settings, rs, self.redis, self.prefix, schedule, dead_letter=dead_letter)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.dispatcher.close()
        await self.redis.aclose()

    async def drain_retries(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            if not self.retries:
                return
            due, self.retries = self.retries, []
            for doc in due:
                await asyncio.sleep(max(0.0, doc["due"] - time.time()))
                await self.dispatcher.on_retry(doc)


def test_payloads_follow_the_published_formats(standin, redis_prefix):
    settings = settings_for(standin)
    alert = alert_doc("carol", "A", "B")
    Alert.model_validate(alert)

    async def run() -> None:
        async with Harness(settings, redis_prefix) as h:
            await h.dispatcher.on_alert(alert)
            await h.dispatcher.on_change(upgrade_doc("carol", "B", "A", "2026-01-05T10:00:00+08:00"))
            assert h.retries == []

    asyncio.run(run())
    by_path = {r.path: [] for r in standin.all()}
    for r in standin.all():
        by_path[r.path].append(r)
    assert set(by_path) == {"/hook", "/slack/T000/B000/XXX", "/pagerduty/v2/enqueue", "/am/api/v2/alerts"}

    # Generic webhook: the grade-alerts document itself.
    (hook,) = by_path["/hook"]
    Alert.model_validate(hook.body)
    assert hook.body == alert and hook.headers["Content-Type"].startswith("application/json")

    # PagerDuty: a trigger, then a resolve with the same dedup_key.
    trigger, resolve = (r.body for r in by_path["/pagerduty/v2/enqueue"])
    jsonschema.validate(trigger, PD_TRIGGER)
    jsonschema.validate(resolve, PD_RESOLVE)
    assert trigger["dedup_key"] == resolve["dedup_key"] == alert["dedup_key"]
    assert trigger["payload"]["severity"] == "critical"
    rfc3339(trigger["payload"]["timestamp"])

    # Alertmanager: firing (endsAt in the future), then the same labels with endsAt = the recovery.
    firing, ended = (r.body for r in by_path["/am/api/v2/alerts"])
    jsonschema.validate(firing, AM_ALERTS)
    jsonschema.validate(ended, AM_ALERTS)
    assert firing[0]["labels"] == ended[0]["labels"]
    assert firing[0]["labels"]["alertname"] and firing[0]["labels"]["customer_id"] == "carol"
    now = datetime.now(timezone.utc)
    assert rfc3339(firing[0]["startsAt"]) < now < rfc3339(firing[0]["endsAt"])
    assert rfc3339(ended[0]["endsAt"]) <= now

    # Slack: a message with fallback text and blocks, then a "resolved" message.
    page, recovered = (r.body for r in by_path["/slack/T000/B000/XXX"])
    jsonschema.validate(page, SLACK)
    jsonschema.validate(recovered, SLACK)
    assert "carol" in page["text"] and "A → B" in page["text"] and "RESOLVED" in recovered["text"]


def test_severity_from_drop_and_grade_left_is_configurable_per_ladder():
    ladder = compile_ruleset(load("rfm-5")).ladders[0]  # S A B C D, key S A
    default = SeverityRule()
    assert severity(ladder, "S", "A", default) == "warning"   # one step, still key
    assert severity(ladder, "A", "B", default) == "critical"  # left the key grades
    assert severity(ladder, "S", "B", default) == "critical"
    lenient = SeverityRule.from_config({"critical_min_drop": 3, "critical_at_or_below": "C", "warning_min_drop": 2})
    assert severity(ladder, "A", "B", lenient) == "info"
    assert severity(ladder, "S", "B", lenient) == "warning"
    assert severity(ladder, "A", "C", lenient) == "critical"
    assert severity(ladder, "S", "C", lenient) == "critical"
    with pytest.raises(ValueError):
        SeverityRule.from_config({"critical_drop": 1})


def test_routes_by_severity_and_cooldown_holds_back_flapping(standin, redis_prefix):
    # warnings go to the webhook only; a second drop of the same customer within the cooldown waits.
    settings = settings_for(standin, alert_routes={"critical": ["webhook", "pagerduty"], "warning": ["webhook"]},
                            alert_cooldown_s=1.5)
    first = alert_doc("dave", "S", "A", "2026-01-01T10:00:00+08:00")
    second = alert_doc("dave", "A", "B", "2026-01-03T10:00:00+08:00")   # worse: pages at once
    third = alert_doc("erin", "A", "B", "2026-01-01T10:00:00+08:00")
    fourth = alert_doc("erin", "A", "B", "2026-01-02T10:00:00+08:00")  # same severity, within cooldown

    async def run() -> None:
        async with Harness(settings, redis_prefix) as h:
            for doc in (first, second, third, fourth):
                await h.dispatcher.on_alert(doc)
            assert [d["item"]["alert_id"] for d in h.retries] == [fourth["alert_id"]] * 2  # webhook and pagerduty
            assert all(d["due"] - time.time() > 1.0 for d in h.retries)
            await h.drain_retries()

    asyncio.run(run())
    hooks = [b["alert_id"] for b in standin.delivered("/hook")]
    assert hooks == [first["alert_id"], second["alert_id"], third["alert_id"], fourth["alert_id"]]
    assert [b["severity"] for b in standin.delivered("/hook")] == ["warning", "critical", "critical", "critical"]
    pd = [b["payload"]["custom_details"]["alert_id"] for b in standin.delivered("/pagerduty/v2/enqueue")]
    assert pd == [second["alert_id"], third["alert_id"], fourth["alert_id"]]


def test_a_trigger_older_than_a_seen_recovery_is_not_sent(standin, redis_prefix):
    settings = settings_for(standin)
    alert = alert_doc("fay", "A", "B", "2026-01-01T10:00:00+08:00")

    async def run() -> None:
        async with Harness(settings, redis_prefix) as h:
            # grade-changes and grade-alerts are not ordered with each other: the recovery came first.
            await h.dispatcher.on_change(upgrade_doc("fay", "B", "A", "2026-01-02T10:00:00+08:00"))
            await h.dispatcher.on_alert(alert)

    asyncio.run(run())
    assert standin.all() == []


def test_a_sink_failing_five_times_then_succeeding_delivers_once_in_process(redis_prefix):
    server = StandIn(fail_first=5).start()
    try:
        settings = load_settings(alert_webhook_url=server.url("/hook"), alert_attempts=3, alert_backoff_s=0.01,
                                 alert_retry_delay_s=0.05)
        alert = alert_doc("gus", "A", "B")

        async def run() -> None:
            async with Harness(settings, redis_prefix) as h:
                await h.dispatcher.on_alert(alert)
                assert len(h.retries) == 1 and h.retries[0]["round"] == 1
                await h.drain_retries()
                # A replay of the same alert (a rebalance) is not delivered again.
                await h.dispatcher.on_alert(alert)
                assert h.retries == []

        asyncio.run(run())
        assert len(server.all("/hook")) == 6
        assert [b["alert_id"] for b in server.delivered("/hook")] == [alert["alert_id"]]
    finally:
        server.stop()


# ----------------------------------------------------------------------------- with workers


def key_customers(n: int, start: int = 0) -> tuple[list, list, list]:
    """n key customers who each drop A → B (one critical alert each), and their later recoveries."""
    first, drops, recoveries = [], [], []
    for i in range(start, start + n):
        c = f"k{i:03d}"

        def txn(eid, at, amount, customer=c):
            return customer.encode(), orjson.dumps({
                "event_id": eid, "customer_id": customer, "occurred_at": at, "type": "purchase",
                "amount": amount, "currency": "CNY"})

        first.append(txn(f"{c}-1", "2025-01-01T10:00:00+08:00", "60000"))       # A (R5 F1 M5)
        drops.append(txn(f"{c}-2", "2026-01-01T10:00:00+08:00", "100"))         # rolled off: B
        recoveries.append(txn(f"{c}-3", "2026-01-02T10:00:00+08:00", "60000"))  # back to A
    return first, drops, recoveries


def worker_env(server: StandIn, **extra: str) -> dict[str, str]:
    env = {
        "GRADEFLOW_ALERT_WEBHOOK_URL": server.url("/hook"),
        "GRADEFLOW_ALERT_PAGERDUTY_ROUTING_KEY": "R0UT1NGKEY0000000000000000000000",
        "GRADEFLOW_ALERT_PAGERDUTY_URL": server.url("/pagerduty/v2/enqueue"),
        "GRADEFLOW_ALERT_ALERTMANAGER_URL": server.url("/am"),
        "GRADEFLOW_ALERT_ATTEMPTS": "3",
        "GRADEFLOW_ALERT_BACKOFF_S": "0.05",
        "GRADEFLOW_ALERT_RETRY_DELAY_S": "1",
        "GRADEFLOW_WEB_PORT": str(free_port()),
        # Re-sends of firing alerts would read as repeats in the once-only checks below.
        "GRADEFLOW_ALERT_ALERTMANAGER_RESEND_S": "3600",
    }
    env.update(extra)
    return env


def test_worker_retries_through_the_retry_topic_and_delivers_once(worker_factory, bootstrap):
    server = StandIn(fail_first=5).start()
    worker = None
    try:
        worker = worker_factory(**worker_env(server, GRADEFLOW_ALERT_PAGERDUTY_ROUTING_KEY="",
                                             GRADEFLOW_ALERT_ALERTMANAGER_URL=""))
        first, drops, _ = key_customers(3)
        produce(bootstrap, worker.env["GRADEFLOW_TOPIC_TRANSACTIONS"], first + drops)
        wait_until(lambda: len(server.delivered("/hook")) >= 3, timeout=90,
                   what=f"3 deliveries; worker log:\n{worker.tail()}")
        time.sleep(4)  # nothing more comes
        delivered = [b["customer_id"] for b in server.delivered("/hook")]
        assert sorted(delivered) == ["k000", "k001", "k002"]
        for c in delivered:
            assert len([r for r in server.all("/hook") if r.body["customer_id"] == c]) == 6
    finally:
        server.stop()
        if worker is not None:
            delete_prefix(worker.env["GRADEFLOW_APP_ID"], REDIS_URL)


def sent_marks(app_id: str, url: str = REDIS_URL) -> set[tuple[str, str]]:
    """(sink, alert id) of every ``sent`` mark in Redis under the app's prefix."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        marks = set()
        for key in client.scan_iter(match=f"{app_id}*:alert:sent:*", count=1000):
            sink, _, ident = key.decode().partition(":alert:sent:")[2].partition(":")
            marks.add((sink, ident))
        return marks
    finally:
        client.close()


def assert_repeats_only_in_flight(copies: list[str], in_flight: set[str], sink: str) -> None:
    """The documented guarantee: once per sink, except an alert the sink had answered and whose
    ``sent`` mark the killed worker had not yet written; that one may come twice, no more."""
    counts = Counter(copies)
    repeated = {ident for ident, n in counts.items() if n > 1}
    assert max(counts.values()) <= 2, f"{sink}: {counts.most_common(3)}"
    assert repeated <= in_flight, f"{sink}: repeated though marked sent (or not yet delivered) at the kill: " \
                                  f"{sorted(repeated - in_flight)}"


def test_two_workers_and_a_restart_deliver_each_alert_once(worker_factory, bootstrap):
    """Every alert reaches every sink; a repeat only of one caught by the crash (see streams/downstream/alerts/delivery.py)."""
    server = StandIn().start()
    env = None
    restarted: list[WorkerProcess] = []
    try:
        w1 = worker_factory(**worker_env(server, GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="10"))
        env = w1.env
        w2 = worker_factory(env={**env, "GRADEFLOW_WEB_PORT": str(free_port())}, name="worker2")
        first, drops, recoveries = key_customers(40)
        topic = env["GRADEFLOW_TOPIC_TRANSACTIONS"]
        produce(bootstrap, topic, first)
        produce(bootstrap, topic, drops[:20])
        wait_until(lambda: len(server.delivered("/hook")) >= 5, timeout=90, what=f"first alerts\n{w1.tail()}")
        w1.kill()  # a crash in the middle
        # What the killed worker can still repeat: delivered, and not marked sent at the kill. Bodies
        # first, marks second: a delivery by worker2 in between is at worst allowed a repeat it never makes.
        delivered_at_kill = {
            "webhook": {b["alert_id"] for b in server.delivered("/hook")},
            "pagerduty": {b["payload"]["custom_details"]["alert_id"] for b in server.delivered("/pagerduty/v2/enqueue")
                          if b["event_action"] == "trigger"},
            "alertmanager": {a["annotations"]["alert_id"] for batch in server.delivered("/am/api/v2/alerts")
                             for a in batch if "alert_id" in a["annotations"]},
        }
        marked = sent_marks(env["GRADEFLOW_APP_ID"])
        assert marked, "no sent marks under the app's prefix at the kill: sent_marks() looks in the wrong place"
        in_flight = {sink: {i for i in ids if (sink, i) not in marked} for sink, ids in delivered_at_kill.items()}
        produce(bootstrap, topic, drops[20:])
        # The killed member holds its partitions until the group's session timeout: allow for it.
        w1b = WorkerProcess({**env, "GRADEFLOW_WEB_PORT": str(free_port()), "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap},
                            name="worker1-restarted")
        restarted.append(w1b)
        w1b.start(ready_timeout=180)
        wait_until(lambda: len({b["alert_id"] for b in server.delivered("/hook")}) >= 40, timeout=120,
                   what=f"40 alerts\n{w2.tail()}\n{w1b.tail()}")
        # PagerDuty is held to its rate (two a second per worker): the recoveries below resolve only
        # incidents already open there (a recovery before its page supersedes the page instead).
        wait_until(lambda: len({b["dedup_key"] for b in server.delivered("/pagerduty/v2/enqueue")
                                if b["event_action"] == "trigger"}) >= 40, timeout=120, what="40 pages")
        produce(bootstrap, topic, recoveries[:10])
        wait_until(lambda: sum(1 for b in server.delivered("/pagerduty/v2/enqueue")
                               if b["event_action"] == "resolve") >= 10, timeout=90, what="10 resolves")
        time.sleep(5)  # late duplicates would show up now

        hook = [b["alert_id"] for b in server.delivered("/hook")]
        assert len(set(hook)) == 40
        assert_repeats_only_in_flight(hook, in_flight["webhook"], "webhook")
        pd = server.delivered("/pagerduty/v2/enqueue")
        triggers = [b for b in pd if b["event_action"] == "trigger"]
        resolves = [b["dedup_key"] for b in pd if b["event_action"] == "resolve"]
        assert len({b["dedup_key"] for b in triggers}) == 40
        assert_repeats_only_in_flight([b["payload"]["custom_details"]["alert_id"] for b in triggers],
                                      in_flight["pagerduty"], "pagerduty")
        assert sorted(resolves) == sorted(f"gradeflow/value/k{i:03d}/key-downgrade" for i in range(10))
        for key in resolves:  # each resolve came after its trigger(s)
            actions = [b["event_action"] for b in pd if b["dedup_key"] == key]
            assert actions[-1] == "resolve" and set(actions[:-1]) == {"trigger"}, actions
        am = server.delivered("/am/api/v2/alerts")
        firing = [a for batch in am for a in batch if rfc3339(a["endsAt"]) > datetime.now(timezone.utc)]
        assert len({a["labels"]["customer_id"] for a in firing}) == 40
        assert_repeats_only_in_flight([a["annotations"]["alert_id"] for a in firing],
                                      in_flight["alertmanager"], "alertmanager")
    finally:
        for worker in restarted:
            worker.stop()
        server.stop()
        if env is not None:
            delete_prefix(env["GRADEFLOW_APP_ID"], REDIS_URL)


def test_bad_alert_settings_stop_the_worker_at_start():
    from schemas.errors import ConfigurationError
    from streams.downstream.alerts.policy import check_settings

    rs = compile_ruleset(load("rfm-5"))
    check_settings(load_settings(), rs)
    for bad in ({"alert_routes": {"critical": ["pager"]}}, {"alert_routes": {"urgent": ["webhook"]}},
                {"alert_severity": {"nope": {}}}, {"alert_severity": {"value": {"critical_at_or_below": "Z"}}},
                {"alert_severity": {"value": {"critical_drop": 1}}}):
        with pytest.raises(ConfigurationError):
            check_settings(load_settings(**bad), rs)


def test_an_alert_produced_long_ago_is_not_sent(standin, redis_prefix):
    """A new deployment reads grade-alerts from its beginning: last month's alerts must not page now."""
    settings = settings_for(standin, alert_max_age_s=3600)
    old, fresh = alert_doc("hal", "A", "B"), alert_doc("ivy", "A", "B")

    async def run() -> None:
        async with Harness(settings, redis_prefix) as h:
            await h.dispatcher.on_alert(old, produced_at=time.time() - 7200)
            await h.dispatcher.on_alert(fresh, produced_at=time.time() - 60)

    asyncio.run(run())
    assert {b["alert_id"] for b in standin.delivered("/hook")} == {fresh["alert_id"]}


def at_risk_doc(customer: str, previous: str = "A", grade: str = "B") -> dict:
    """An at-risk warning as rules/risk.py writes it on grade-alerts."""
    from rules import risk
    from rules.state import CustomerState, apply_transaction
    from rules import windows
    from rules.engine import evaluate
    from datetime import timedelta

    rs = compile_ruleset(load("rfm-5"))
    state = CustomerState()
    for hour in (10, 11):
        moment = datetime.fromisoformat(f"2026-03-10T{hour}:00:00+08:00")
        apply_transaction(state, moment.timestamp(), windows.local_day(moment, rs.tz), False, 250000)
    state.grades = dict(evaluate(rs, state, moment).grades)
    [doc], _ = risk.warnings(customer, rs, state, datetime.fromisoformat("2026-03-15T00:00:00+08:00"),
                             timedelta(days=7))
    assert (doc["previous_grade"], doc["grade"]) == (previous, grade)
    return doc


def test_an_at_risk_warning_keeps_its_severity_and_is_not_a_downgrade_incident(standin, redis_prefix):
    settings = settings_for(standin)
    warning = at_risk_doc("gus")
    Alert.model_validate(warning)
    down = alert_doc("gus", "A", "B", "2026-03-18T00:00:00+08:00")
    assert Alert.model_validate(down).kind == "downgrade"  # absent: a downgrade, as before

    async def run() -> None:
        async with Harness(settings, redis_prefix) as h:
            await h.dispatcher.on_alert(warning)
            await h.dispatcher.on_alert(warning)  # a repeat (same id) is delivered once
            await h.dispatcher.on_alert(down)  # not held back by the warning's cooldown
            await h.dispatcher.on_change(upgrade_doc("gus", "B", "A", "2026-03-20T10:00:00+08:00"))
            assert h.retries == []

    asyncio.run(run())
    hooks = standin.delivered("/hook")
    assert [(b["alert_id"], b["severity"], b.get("kind")) for b in hooks] == [
        (warning["alert_id"], "info", "at_risk"), (down["alert_id"], "critical", None)]
    Alert.model_validate(hooks[0])
    # info goes to the webhook and Alertmanager only (default routes): PagerDuty gets the downgrade
    # and its resolve, with the downgrade's dedup_key
    pd = standin.delivered("/pagerduty/v2/enqueue")
    assert [(b["event_action"], b["dedup_key"]) for b in pd] == [("trigger", down["dedup_key"]),
                                                                ("resolve", down["dedup_key"])]
    am = standin.delivered("/am/api/v2/alerts")
    for body in am:
        jsonschema.validate(body, AM_ALERTS)
    names = [b[0]["labels"]["alertname"] for b in am]
    assert names == ["GradeflowKeyCustomerAtRisk", "GradeflowKeyCustomerDowngrade", "GradeflowKeyCustomerDowngrade"]
    assert rfc3339(am[0][0]["endsAt"]) >= rfc3339(warning["due_at"])
    assert standin.delivered("/slack/T000/B000/XXX")[0]["text"].count("AT RISK") == 0  # slack: critical only


def test_an_at_risk_warning_routed_to_slack_and_pagerduty_reads_as_one():
    from streams.downstream.alerts.sinks import PagerDutySink, SlackSink

    warning = at_risk_doc("hal")
    slack = SlackSink("http://x").trigger(warning).body
    jsonschema.validate(slack, SLACK)
    assert "AT RISK" in slack["text"] and "A → B" in slack["text"] and warning["due_at"] in slack["text"]
    pd = PagerDutySink("http://x", "R0UT1NGKEY0000000000000000000000", "gradeflow").trigger(warning).body
    jsonschema.validate(pd, PD_TRIGGER)
    assert pd["payload"]["class"] == "key-customer-at-risk" and pd["dedup_key"] == warning["dedup_key"]


# ----------------------------------------------------------------------------- errors per vendor


def test_errors_are_classified_as_each_vendor_documents():
    from streams.downstream.alerts.policy import PERMANENT, TRANSIENT, classify
    from streams.downstream.alerts.sinks import AlertmanagerSink, PagerDutySink, SlackSink, WebhookSink

    table = {
        # PagerDuty Events API v2: 400 invalid event; 429 rate limited; 5xx.
        PagerDutySink: {400: PERMANENT, 429: TRANSIENT, 500: TRANSIENT, 502: TRANSIENT, 503: TRANSIENT},
        # Slack incoming webhooks: invalid payload, action prohibited, no service, archived channel.
        SlackSink: {400: PERMANENT, 403: PERMANENT, 404: PERMANENT, 410: PERMANENT, 429: TRANSIENT, 500: TRANSIENT},
        # Generic webhook: 4xx but 408/425/429 permanent; 5xx transient.
        WebhookSink: {400: PERMANENT, 401: PERMANENT, 404: PERMANENT, 422: PERMANENT, 408: TRANSIENT,
                      425: TRANSIENT, 429: TRANSIENT, 500: TRANSIENT, 504: TRANSIENT},
        # Alertmanager: 400 bad request; 5xx.
        AlertmanagerSink: {400: PERMANENT, 500: TRANSIENT, 503: TRANSIENT},
    }
    for sink, expected in table.items():
        for status, verdict in expected.items():
            assert classify(sink.statuses, status) == verdict, (sink.name, status)
        assert classify(sink.statuses, None) == TRANSIENT, sink.name  # no answer: refused, reset, timeout


def test_retry_after_is_read_in_seconds_or_as_an_http_date():
    from email.utils import format_datetime

    from streams.downstream.alerts.policy import retry_after_s

    now = time.time()
    assert retry_after_s("7", now) == 7.0
    later = format_datetime(datetime.fromtimestamp(int(now) + 30, timezone.utc), usegmt=True)
    assert retry_after_s(later, int(now)) == 30.0
    assert retry_after_s(format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True), now) == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None


def scripted_settings(server: Scripted, **extra):
    return load_settings(
        alert_webhook_url=server.url("/hook"),
        alert_slack_webhook_url=server.url("/slack/T000/B000/XXX"),
        alert_pagerduty_routing_key="R0UT1NGKEY0000000000000000000000",
        alert_pagerduty_url=server.url("/pd"),
        alert_alertmanager_url=server.url("/am"),
        **{"alert_attempts": 3, "alert_backoff_s": 0.01, "alert_retry_delay_s": 0.1, **extra})


def test_a_permanent_refusal_gets_one_attempt_and_one_alert_dead_letter(redis_prefix):
    alert = alert_doc("ned", "A", "B")
    paths = {"webhook": "/hook", "slack": "/slack/T000/B000/XXX", "pagerduty": "/pd", "alertmanager": "/am/api/v2/alerts"}
    refusals = {"webhook": 404, "slack": 410, "pagerduty": 400, "alertmanager": 400}

    async def run() -> None:
        async with Scripted() as server:
            server.answer("/hook", Answer(404, body="no such hook"))
            server.answer("/slack/T000/B000/XXX", Answer(410, body="channel_is_archived"))
            # A vendor may echo the request back: the routing key must not reach the dead letter.
            server.answer("/pd", Answer(400, body='{"status":"invalid event","message":"Event object is invalid",'
                                                  '"errors":["bad key R0UT1NGKEY0000000000000000000000"]}'))
            server.answer("/am/api/v2/alerts", Answer(400, body="bad alert"))
            async with Harness(scripted_settings(server), redis_prefix) as h:
                await h.dispatcher.on_alert(alert)
                await h.dispatcher.on_alert(alert)  # a replay (rebalance) is not tried again
                assert h.retries == []
                for path in paths.values():
                    assert len(server.at(path)) == 1, path
                dead = {d["sink"]: d for d in h.dead}
                assert sorted(dead) == sorted(paths) and len(h.dead) == 4
                for sink, doc in dead.items():
                    assert doc["status"] == refusals[sink] and doc["action"] == "trigger"
                    assert doc["alert"]["alert_id"] == alert["alert_id"] and doc["alert"]["customer_id"] == "ned"
                    datetime.fromisoformat(doc["dead_lettered_at"])
                assert dead["slack"]["response_excerpt"] == "channel_is_archived"
                assert "invalid event" in dead["pagerduty"]["response_excerpt"]
                assert "R0UT1NGKEY" not in orjson.dumps(h.dead).decode()
                # Nothing paged, so a later drop of the same customer is not held back by a cooldown.
                later = alert_doc("ned", "A", "C", "2026-01-02T10:00:00+08:00")
                await h.dispatcher.on_alert(later)
                assert h.retries == [] and len(server.at("/hook")) == 2

    asyncio.run(run())


def test_a_429_with_retry_after_is_retried_after_at_least_that_delay(redis_prefix):
    from email.utils import format_datetime

    alert = alert_doc("olga", "A", "B")

    async def run() -> None:
        async with Scripted() as server:
            server.answer("/slack/T000/B000/XXX", Answer(429, {"Retry-After": "1"}, "rate_limited"))
            # An HTTP date two seconds ahead (whole seconds): at least one second away.
            when = format_datetime(datetime.fromtimestamp(int(time.time()) + 2, timezone.utc), usegmt=True)
            server.answer("/pd", Answer(429, {"Retry-After": when}, '{"status":"throttle event"}'))
            # A wait longer than the in-line back-off goes to the retry topic, due no earlier.
            server.answer("/hook", Answer(503, {"Retry-After": "30"}, "maintenance"))
            settings = scripted_settings(server, alert_backoff_s=0.4, alert_routes={"critical": ["slack", "pagerduty",
                                                                                                 "webhook"]})
            async with Harness(settings, redis_prefix) as h:
                before = time.time()
                await h.dispatcher.on_alert(alert)
                for path in ("/slack/T000/B000/XXX", "/pd"):
                    first, second = server.at(path)
                    assert second.at - first.at >= 1.0, path
                [retry] = h.retries
                assert retry["sink"] == "webhook" and retry["due"] - before >= 30
                assert len(server.at("/hook")) == 1 and h.dead == []

    asyncio.run(run())


def test_the_alert_dead_letter_topic_is_in_the_layout_topics_create_makes():
    from streams.topics import OUTPUT, topic_specs

    s = load_settings(topic_prefix="team-risk.", alert_dead_letters_retention_ms=3_600_000)
    specs = {spec.name: spec for spec in topic_specs(s)}
    spec = specs["team-risk.alert-dead-letters"]
    assert s.topics.alert_dead_letters == spec.name
    assert spec.role == OUTPUT and spec.partitions == s.partitions and spec.cleanup_policy == "delete"
    assert spec.config["retention.ms"] == "3600000"


# ----------------------------------------------------------------------------- rate limits and storms


def clock_alert(customer: str, as_of: str = "2026-02-01T00:00:00+08:00", cause: str = "clock") -> dict:
    """A downgrade alert whose grade change the clock (or new rules) made, with the id rules/changes.py gives it."""
    from rules.changes import Cause, change_id

    rs = compile_ruleset(load("rfm-5"))
    doc = alert_doc(customer, "A", "B", as_of)
    doc["grade_change_event_id"] = change_id(customer, "value", rs, Cause(cause, None), datetime.fromisoformat(as_of),
                                             "A", "B")
    return doc


def test_the_cause_of_an_alert_is_the_cause_it_carries():
    from rules.changes import Cause, decide_changes
    from streams.downstream.alerts.policy import cause_of
    from tests.rules.test_changes import AS_OF, NOW, _ev

    rs = compile_ruleset(load("rfm-5"))
    for kind, event_id in (("transaction", "t-1"), ("interaction", "i-1"), ("clock", None), ("rules", None)):
        _changes, [alert] = decide_changes("pia", rs, {"value": "A"}, _ev(rs, "B"), AS_OF, Cause(kind, event_id), NOW)
        assert cause_of(alert, rs) == kind
    assert cause_of(at_risk_doc("pia"), rs) == "clock"


def test_an_alert_of_an_earlier_release_has_its_cause_told_from_its_grade_change_id():
    from streams.downstream.alerts.policy import cause_of

    rs = compile_ruleset(load("rfm-5"))
    assert cause_of(clock_alert("pia"), rs) == "clock"
    assert cause_of(clock_alert("pia", cause="rules"), rs) == "rules"
    assert cause_of(alert_doc("pia", "A", "B"), rs) == "event"  # a transaction's change id carries its event id
    assert cause_of(at_risk_doc("pia"), rs) == "clock"


def test_the_storm_guard_folds_past_its_threshold_and_sums_up():
    from streams.downstream.alerts.policy import StormGuard

    guard = StormGuard(threshold=3, window_s=60)
    assert [guard.folds(n) for n in range(1, 6)] == [False, False, False, True, True]
    assert not StormGuard(0, 60).folds(10_000)
    assert guard.window(119.9) == 1 and guard.bounds(1) == (60.0, 120.0)
    summary = guard.summary(1, {("value", "clock", "critical"): 7, ("value", "event", "warning"): 2}, "gradeflow")
    assert summary["count"] == 9 and summary["ladder"] == "value" and summary["severity"] == "critical"
    assert summary["causes"] == {"clock": 7, "event": 2}
    assert "9 more" in summary["summary"] and "7 on ladder 'value' caused by the clock" in summary["summary"]
    assert summary == guard.summary(1, {("value", "event", "warning"): 2, ("value", "clock", "critical"): 7},
                                    "gradeflow")  # deterministic: a re-send has the same alert_id


def test_an_alert_storm_pages_up_to_the_threshold_then_sends_one_summary(redis_prefix):
    alerts = [clock_alert(f"storm{i:02d}") for i in range(8)]

    async def run() -> None:
        async with Scripted() as server:
            settings = scripted_settings(server, alert_storm_threshold=3, alert_storm_window_s=3600,
                                         alert_routes={"critical": ["webhook", "pagerduty"]})
            async with Harness(settings, redis_prefix) as h:
                for doc in alerts:
                    await h.dispatcher.on_alert(doc)
                await h.dispatcher.on_alert(alerts[7])  # a replay of a folded alert is not counted twice
                await h.dispatcher.on_alert(alerts[0])  # nor one of a paged alert, sent once
                sent = [hit.body["customer_id"] for hit in server.at("/hook")]
                assert sent == ["storm00", "storm01", "storm02"]
                [summary_due] = h.retries
                window_end = (int(time.time() // 3600) + 1) * 3600
                assert summary_due["kind"] == "storm_summary" and summary_due["due"] >= window_end
                await h.dispatcher.on_retry(summary_due)  # as the retry topic hands it back when due
                await h.dispatcher.on_retry(summary_due)  # twice (a crash before the commit): sent once
                summary = server.at("/hook")[-1].body
                assert len(server.at("/hook")) == 4 and summary["kind"] == "storm"
                assert summary["count"] == 5 and summary["ladder"] == "value" and summary["causes"] == {"clock": 5}
                assert "caused by the clock" in summary["summary"]
                [pd] = [hit.body for hit in server.at("/pd") if hit.body["payload"]["class"] == "alert-storm"]
                assert pd["payload"]["custom_details"]["count"] == 5
                assert len(server.at("/pd")) == 4

    asyncio.run(run())


def test_each_sink_is_held_to_its_rate(redis_prefix):
    from streams.downstream.alerts.delivery import rate_limiter

    pd = rate_limiter(load_settings().alert_pagerduty_rate_per_min)  # 120 a minute: 2 a second
    assert (pd.max_rate, pd.time_period) == (2.0, 1.0)

    async def run() -> None:
        async with Scripted() as server:
            settings = scripted_settings(server, alert_webhook_rate_per_min=120, alert_routes={"critical": ["webhook"]})
            async with Harness(settings, redis_prefix) as h:
                for i in range(6):
                    await h.dispatcher.on_alert(alert_doc(f"rate{i}", "A", "B"))
            hits = server.at("/hook")
            assert len(hits) == 6
            # Two at once, then one every half second: the sixth 2 s after the first.
            assert hits[-1].at - hits[0].at >= 1.9
            assert hits[2].at - hits[0].at >= 0.45

    asyncio.run(run())


# ----------------------------------------------------------------------------- Slack escapes, signatures


def test_slack_text_never_pings_whatever_the_customer_id():
    from streams.downstream.alerts.sinks import SlackSink

    sink = SlackSink("http://127.0.0.1:9/slack")
    alert = alert_doc("<!here>", "A", "B")
    alert["summary"] = "Customer <!here> & <@U024BE7LH> dropped <https://evil.example|click>."
    resolve = sink.resolve({"customer_id": "<!channel>", "ladder": "value", "previous_grade": "B", "grade": "A",
                            "as_of": "2026-01-02T10:00:00+08:00", "recovery_id": "r", "dedup_key": "d"}, "")
    assert resolve is not None
    for body in (sink.trigger(alert).body, sink.trigger({**at_risk_doc("x"), "customer_id": "<!everyone>"}).body,
                 resolve.body):
        jsonschema.validate(body, SLACK)
        texts = [body["text"]] + [b["text"]["text"] for b in body["blocks"] if "text" in b] + \
                [e["text"] for b in body["blocks"] for e in b.get("elements", [])]
        for text in texts:
            assert "<" not in text and ">" not in text, text
            assert "&" not in text.replace("&amp;", "").replace("&lt;", "").replace("&gt;", ""), text
    assert "&lt;!here&gt;" in sink.trigger(alert).body["text"]


def verify(secret: str, headers: dict[str, str], body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """The receiver's check, as docs/downstream.md shows it."""
    import hashlib
    import hmac

    stamp = headers["X-Gradeflow-Timestamp"]
    if abs(now - int(stamp)) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Gradeflow-Signature"], "v1=" + expected)


def test_webhook_bodies_are_signed_and_the_secret_is_never_shown(redis_prefix, caplog):
    import logging

    secret = "whsec-" + uuid.uuid4().hex
    alert = alert_doc("quinn", "A", "B")

    async def run() -> None:
        async with Scripted() as server:
            server.answer("/hook", Answer(503, body=f"echo {secret}"))  # a failed attempt first: signed again
            settings = scripted_settings(server, alert_webhook_secret=secret, alert_routes={"critical": ["webhook"]},
                                         alert_backoff_s=0.05)
            assert secret not in repr(settings) and secret not in str(settings.model_dump())
            async with Harness(settings, redis_prefix) as h:
                assert secret not in repr(h.dispatcher.sinks)
                with caplog.at_level(logging.DEBUG):
                    await h.dispatcher.on_alert(alert)
                first, second = server.at("/hook")
                for hit in (first, second):
                    assert hit.headers["X-Gradeflow-Signature"].startswith("v1=")
                    assert verify(secret, hit.headers, hit.raw, time.time())
                    assert not verify("another secret", hit.headers, hit.raw, time.time())
                    assert not verify(secret, hit.headers, hit.raw + b" ", time.time())
                assert second.body == alert
                assert not verify(secret, second.headers, second.raw, time.time() + 3600)  # a replay, an hour on

    asyncio.run(run())
    assert secret not in caplog.text
    # Unset: no signature headers at all.
    from streams.downstream.alerts.sinks import WebhookSink

    assert WebhookSink("http://127.0.0.1:9/hook").trigger(alert).sign is None


# ----------------------------------------------------------------------------- Alertmanager


def test_alertmanager_alerts_link_to_the_api_and_end_a_few_resends_ahead():
    from streams.downstream.alerts.sinks import AlertmanagerSink, api_base_url, build_sinks

    settings = load_settings(alert_alertmanager_url="http://am-0:9093, http://am-1:9093/", web_host="10.1.2.3",
                             web_port=6070, alert_alertmanager_resend_s=30)
    sink = build_sinks(settings)["alertmanager"]
    assert isinstance(sink, AlertmanagerSink)
    assert sink.urls == ("http://am-0:9093/api/v2/alerts", "http://am-1:9093/api/v2/alerts")
    request = sink.trigger(alert_doc("a/b c", "A", "B"))
    [item] = request.body
    jsonschema.validate(request.body, AM_ALERTS)
    assert request.urls == sink.urls
    assert item["generatorURL"] == "http://10.1.2.3:6070/customers/a%2Fb%20c"
    ends = rfc3339(item["endsAt"]).timestamp()
    assert time.time() + 110 < ends <= time.time() + 121  # four intervals of 30 s, not days
    assert api_base_url(load_settings(alert_link_base_url="https://gradeflow.internal/")) == \
        "https://gradeflow.internal"


async def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.mark.timeout(1800)  # the first run on a machine builds Alertmanager (minutes on 2 cores)
def test_a_real_alertmanager_ha_pair_fires_keeps_firing_across_a_restart_and_resolves(redis_prefix):
    """Two real Alertmanagers (built by deploy/local/alertmanager): fire → both show it; restart
    one (it keeps alerts in memory only) → back within one re-send interval; recover → resolved."""
    from oncall_helpers import Alertmanager, alertmanager_binary

    binary = alertmanager_binary()
    ams = [Alertmanager(binary, free_port()), Alertmanager(binary, free_port())]
    resend_s = 1.5
    alert = alert_doc("<rita>", "A", "B", datetime.now(timezone.utc).isoformat())

    async def ours(am: Alertmanager) -> list[dict]:
        return [a for a in await am.alerts() if a["labels"].get("customer_id") == "<rita>"]

    async def firing(am: Alertmanager) -> dict | None:
        found = [a for a in await ours(am) if a["status"]["state"] == "active"
                 and rfc3339(a["endsAt"]) > datetime.now(timezone.utc)]
        return found[0] if found else None

    async def resolved(am: Alertmanager) -> bool:
        # Alertmanager lists a resolved alert with its endsAt passed, or no longer at all.
        return all(rfc3339(a["endsAt"]) <= datetime.now(timezone.utc) for a in await ours(am))

    async def run() -> None:
        for am in ams:
            am.start()
        for am in ams:
            await am.ready()
        settings = load_settings(alert_alertmanager_url=",".join(am.url for am in ams),
                                 alert_alertmanager_resend_s=resend_s, alert_routes={"critical": ["alertmanager"]},
                                 alert_attempts=2, alert_backoff_s=0.05, web_port=6077)
        async with Harness(settings, redis_prefix) as h:
            resender = asyncio.create_task(h.dispatcher.resend_loop())
            try:
                await h.dispatcher.on_alert(alert)
                for am in ams:
                    shown = await wait_for(lambda am=am: firing(am), 10, f"the alert in {am.url}")
                    assert shown["labels"]["alertname"] == "GradeflowKeyCustomerDowngrade"
                    assert shown["generatorURL"] == "http://127.0.0.1:6077/customers/%3Crita%3E"
                    # endsAt a few re-send intervals ahead, not days.
                    assert rfc3339(shown["endsAt"]).timestamp() <= time.time() + 4 * resend_s + 1

                ams[0].stop()
                ams[0].start()
                await ams[0].ready()
                restarted = time.monotonic()
                await wait_for(lambda: firing(ams[0]), resend_s + 3, "the alert back after the restart")
                assert time.monotonic() - restarted <= resend_s + 3

                await h.dispatcher.on_change(upgrade_doc("<rita>", "B", "A", datetime.now(timezone.utc).isoformat()))
                for am in ams:
                    await wait_for(lambda am=am: resolved(am), 10, f"resolved in {am.url}")
                # Not re-sent once resolved: still resolved over the next two intervals.
                later = time.monotonic() + 2 * resend_s
                while time.monotonic() < later:
                    for am in ams:
                        assert await resolved(am), await ours(am)
                    await asyncio.sleep(0.3)
            finally:
                resender.cancel()

    try:
        asyncio.run(run())
    except BaseException:
        print("\n".join(am.log() for am in ams))
        raise
    finally:
        for am in ams:
            am.remove()


def test_the_firing_set_outlives_the_worker_and_is_bounded(redis_prefix):
    """The set re-sent to Alertmanager is in Redis: a new worker (dispatcher) re-sends what the old
    one fired; resolved alerts leave it; past the bound a new alert is sent once, not kept."""

    async def run() -> None:
        async with Scripted() as server:
            settings = scripted_settings(server, alert_routes={"critical": ["alertmanager"]},
                                         alert_alertmanager_max_firing=2)
            async with Harness(settings, redis_prefix) as first:
                for c in ("sam", "tess", "uma"):
                    await first.dispatcher.on_alert(alert_doc(c, "A", "B"))
            assert len(server.at("/am/api/v2/alerts")) == 3
            async with Harness(settings, redis_prefix) as second:  # a restarted worker
                assert await second.dispatcher.resend_firing() == 2
                [resent] = server.at("/am/api/v2/alerts")[3:]
                assert sorted(a["labels"]["customer_id"] for a in resent.body) == ["sam", "tess"]
                assert await second.dispatcher.resend_firing() == 0  # another worker had this interval
                await second.redis.delete(f"{redis_prefix}:alert:resend:alertmanager")
                await second.dispatcher.on_change(upgrade_doc("sam", "B", "A", "2026-01-05T10:00:00+08:00"))
                assert await second.dispatcher.resend_firing() == 1
                assert [a["labels"]["customer_id"] for a in server.at("/am/api/v2/alerts")[-1].body] == ["tess"]

    asyncio.run(run())


# ----------------------------------------------------------------------------- a ruleset change's pages


def rules_alert(customer: str) -> dict:
    """A downgrade alert that a promotion made (cause rules, as rules/changes.py writes it)."""
    doc = clock_alert(customer, cause="rules")
    doc["cause"] = {"kind": "rules", "event_id": "promotion-1", "previous_ruleset": {"id": "rfm-5", "version": "1"}}
    return doc


def test_pages_of_a_ruleset_change_fold_into_one_summary_whatever_the_threshold(redis_prefix):
    promoted = [rules_alert(f"promo{i}") for i in range(5)]

    async def run() -> None:
        async with Scripted() as server:
            settings = scripted_settings(server, alert_storm_threshold=50, alert_storm_window_s=3600,
                                         alert_routes={"critical": ["webhook"]})
            assert settings.alert_fold_rules_changes  # the default
            async with Harness(settings, redis_prefix) as h:
                await h.dispatcher.on_alert(alert_doc("buyer", "A", "B"))
                for doc in promoted:
                    await h.dispatcher.on_alert(doc)
                await h.dispatcher.on_alert(promoted[0])  # a redelivery is not counted twice
                await h.dispatcher.on_alert(alert_doc("buyer2", "A", "B"))
                # The customers' own pages go out; the promotion's wait for the window's summary.
                assert [hit.body["customer_id"] for hit in server.at("/hook")] == ["buyer", "buyer2"]
                [summary_due] = h.retries
                assert summary_due["kind"] == "storm_summary" and summary_due["item"]["ladder"] == "value"
                await h.dispatcher.on_retry(summary_due)
                await h.dispatcher.on_retry(summary_due)  # twice (a crash before the commit): sent once
                assert len(server.at("/hook")) == 3
                summary = server.at("/hook")[-1].body
                assert summary["kind"] == "storm" and summary["ladder"] == "value" and summary["count"] == 5
                assert summary["causes"] == {"rules": 5} and summary["severity"] == "critical"
                assert summary["folded"] == [{"ladder": "value", "cause": "rules", "severity": "critical", "count": 5}]
                assert summary["summary"].startswith("Ruleset change: 5 key customers were downgraded on ladder "
                                                     "'value'")

    asyncio.run(run())


def test_pages_of_a_ruleset_change_are_pages_like_any_when_folding_is_off(redis_prefix):
    async def run() -> None:
        async with Scripted() as server:
            settings = scripted_settings(server, alert_storm_threshold=50, alert_storm_window_s=3600,
                                         alert_routes={"critical": ["webhook"]}, alert_fold_rules_changes=False)
            async with Harness(settings, redis_prefix) as h:
                for i in range(3):
                    await h.dispatcher.on_alert(rules_alert(f"promo{i}"))
                assert [hit.body["customer_id"] for hit in server.at("/hook")] == ["promo0", "promo1", "promo2"]
                assert h.retries == []

    asyncio.run(run())


def test_a_recovery_resolves_on_an_upgrade_into_a_key_grade_and_on_the_end_of_a_merged_id():
    from streams.downstream.alerts.policy import recovery_of

    rs = compile_ruleset(load("rfm-5"))

    def change(direction: str, previous: str, grade: str) -> dict:
        return {"event_id": f"e-{direction}-{grade}", "customer_id": "pia", "ladder": "value",
                "previous_grade": previous, "grade": grade, "direction": direction,
                "as_of": "2026-01-02T10:00:00+08:00"}

    assert recovery_of(change("upgrade", "B", "A"), rs)["dedup_key"] == "gradeflow/value/pia/key-downgrade"
    assert recovery_of(change("upgrade", "D", "C"), rs) is None  # not into a key grade
    assert recovery_of(change("downgrade", "A", "B"), rs) is None
    # Merged into another id: nobody is left to page about on this one.
    ended = recovery_of(change("ended", "B", "none"), rs)
    assert ended is not None and ended["grade"] == "none" and ended["dedup_key"] == "gradeflow/value/pia/key-downgrade"
