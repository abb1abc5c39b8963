"""Key-customer alerts delivered to on-call: sinks, severity, retries, once-only delivery.

The ``alert-dispatcher`` agent (streams/downstream.py) reads ``grade-alerts``
(downgrades of key customers, decided by rules/changes.py) *and*
``grade-changes``: an upgrade that lands in a key grade is a *recovery*, which
resolves the incident in the sinks that have one (PagerDuty ``resolve``,
Alertmanager ``endsAt``, a Slack "recovered" message). Reading the change
stream instead of adding a "recovered" alert to rules/changes.py keeps the
public alert contract and the hot path as they are; the price is that the two
topics are not ordered with respect to each other, which the Redis
``recovered`` marker below settles (a trigger older than a recovery already
seen is superseded and not sent).

At-risk warnings (``"kind": "at_risk"``, from the clock, rules/risk.py) travel
the same way but are not downgrades: they keep their own severity (routed like
any alert of that severity), have their own ``dedup_key`` (``…/at-risk``: their
cooldown and ``open`` marks never touch the downgrade's incident, and a
recovery never resolves them), PagerDuty ``class`` ``key-customer-at-risk`` and
Alertmanager ``alertname`` ``GradeflowKeyCustomerAtRisk`` ending at ``due_at``.

Once-only delivery, per sink, in Redis (``P`` the key prefix):

``P:alert:sent:<sink>:<id>``        delivered (id: alert_id, or the recovery's change event id)
``P:alert:claim:<sink>:<id>``       a worker is delivering it now (``SET NX PX`` lease)
``P:alert:cooldown:<sink>:<dedup>`` the alert_id that paged last for this customer and ladder
                                    (``SET NX`` with expiry: at most one page per cooldown)
``P:alert:open:<sink>:<dedup>``     an incident is open at the sink (a recovery resolves it)
``P:alert:recovered:<dedup>``       ``as_of`` (µs) of the latest recovery seen

A delivery that fails after ``alert_attempts`` tries in line (exponential
backoff) goes to the retry topic with a due time and is tried again, round
after round with a growing (capped) delay: never dropped. A trigger held back
by the cooldown goes there too, due when the cooldown ends; if the customer
recovered meanwhile it is superseded. Only a crash between a sink's answer and
the ``sent`` mark can deliver twice; PagerDuty (dedup_key) and Alertmanager
(labels) merge such a repeat into the same incident.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import orjson

from rules.engine import CompiledLadder, CompiledRuleset
from streams.redis_grades import epoch_us

log = logging.getLogger("gradeflow.alerts")

TRIGGER, RESOLVE = "trigger", "resolve"
SEVERITIES = ("critical", "warning", "info")
SEV_RANK = {"info": 0, "warning": 1, "critical": 2}
PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


# --------------------------------------------------------------------------- severity


@dataclass(frozen=True)
class SeverityRule:
    """How bad a downgrade is, for one ladder.

    critical when the grade fell by ``critical_min_drop`` steps or more, or the
    grade left is ``critical_at_or_below`` or worse (default: any grade that is
    not a key grade); else warning when it fell by ``warning_min_drop`` steps or
    more; else info.
    """

    critical_min_drop: int = 2
    critical_at_or_below: str | None = None
    warning_min_drop: int = 1

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> "SeverityRule":
        raw = dict(raw or {})
        unknown = set(raw) - {"critical_min_drop", "critical_at_or_below", "warning_min_drop"}
        if unknown:
            raise ValueError(f"unknown alert severity setting(s): {', '.join(sorted(unknown))}")
        return cls(**raw)


def severity(ladder: CompiledLadder, previous: str, grade: str, rule: SeverityRule) -> str:
    """Severity of the downgrade ``previous`` → ``grade`` on ``ladder``."""
    rank = ladder.rank
    drop = rank.get(grade, len(rank)) - rank.get(previous, 0)
    if rule.critical_at_or_below is not None:
        bad = rank.get(grade, len(rank)) >= rank.get(rule.critical_at_or_below, len(rank))
    else:
        bad = grade not in ladder.key
    if drop >= rule.critical_min_drop or bad:
        return "critical"
    if drop >= rule.warning_min_drop:
        return "warning"
    return "info"


def dedup_key(ladder: str, customer_id: str) -> str:
    """The alert's ``dedup_key``, as rules/changes.py builds it (stable per customer and ladder)."""
    return f"gradeflow/{ladder}/{customer_id}/key-downgrade"


def is_at_risk(alert: dict[str, Any]) -> bool:
    """Whether ``alert`` is an at-risk warning (kind ``at_risk``, rules/risk.py), not a downgrade."""
    return alert.get("kind") == "at_risk"


def recovery_of(change: dict[str, Any], ruleset: CompiledRuleset) -> dict[str, Any] | None:
    """A recovery if ``change`` is an upgrade into a key grade, else None."""
    if change.get("direction") != "upgrade":
        return None
    ladder = next((lad for lad in ruleset.ladders if lad.name == change.get("ladder")), None)
    if ladder is None or change.get("grade") not in ladder.key:
        return None
    return {
        "recovery_id": change["event_id"],
        "customer_id": change["customer_id"],
        "ladder": ladder.name,
        "previous_grade": change.get("previous_grade"),
        "grade": change["grade"],
        "as_of": change["as_of"],
        "grade_change_event_id": change["event_id"],
        "dedup_key": dedup_key(ladder.name, change["customer_id"]),
    }


# --------------------------------------------------------------------------- sinks


class DeliveryError(Exception):
    """A sink did not accept a message."""


@dataclass(frozen=True)
class Request:
    url: str
    body: Any
    headers: dict[str, str]


class Sink:
    """One destination; builds the requests in the destination's published format."""

    name = "sink"
    resolves = False

    def trigger(self, alert: dict[str, Any]) -> Request:
        raise NotImplementedError

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request | None:
        return None


JSON = {"Content-Type": "application/json"}


class WebhookSink(Sink):
    """Generic JSON webhook: the alert document of ``grade-alerts``, as is (severity as dispatched)."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self.url = url

    def trigger(self, alert: dict[str, Any]) -> Request:
        return Request(self.url, alert, dict(JSON))


class SlackSink(Sink):
    """Slack incoming webhook: ``text`` (the fallback and notification line) plus Block Kit blocks."""

    name = "slack"
    resolves = True
    ICON = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}

    def __init__(self, url: str) -> None:
        self.url = url

    def trigger(self, alert: dict[str, Any]) -> Request:
        if is_at_risk(alert):
            head = (f":hourglass: [AT RISK] Customer {alert['customer_id']}: {alert['previous_grade']} → "
                    f"{alert['grade']} on ladder '{alert['ladder']}' at {alert.get('due_at')} unless something changes")
        else:
            head = (f"{self.ICON.get(alert['severity'], '')} [{alert['severity'].upper()}] "
                    f"Customer {alert['customer_id']}: {alert['previous_grade']} → {alert['grade']} "
                    f"on ladder '{alert['ladder']}'").strip()
        body = {
            "text": head,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_slack_escape(head)}*"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(alert["summary"])[:2900]}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(
                    f"as of {alert['as_of']} · alert {alert['alert_id']} · {alert['dedup_key']}")}]},
            ],
        }
        return Request(self.url, body, dict(JSON))

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request:
        text = (f":white_check_mark: [RESOLVED] Customer {recovery['customer_id']} is back in a key grade on "
                f"ladder '{recovery['ladder']}': {recovery['previous_grade']} → {recovery['grade']} "
                f"(as of {recovery['as_of']})")
        return Request(self.url, {"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(text)}}]}, dict(JSON))


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class PagerDutySink(Sink):
    """PagerDuty Events API v2: ``trigger`` with ``dedup_key``; ``resolve`` on recovery."""

    name = "pagerduty"
    resolves = True

    def __init__(self, url: str, routing_key: str, source: str) -> None:
        self.url = url
        self.routing_key = routing_key
        self.source = source

    @staticmethod
    def dedup(key: str) -> str:
        # PagerDuty takes at most 255 characters; customer ids may be longer.
        if len(key) <= 255:
            return key
        return key[:200] + "#" + hashlib.sha256(key.encode()).hexdigest()[:32]

    def trigger(self, alert: dict[str, Any]) -> Request:
        body = {
            "routing_key": self.routing_key,
            "event_action": "trigger",
            "dedup_key": self.dedup(alert["dedup_key"]),
            "payload": {
                "summary": alert["summary"][:1024],
                "source": self.source,
                "severity": PD_SEVERITY.get(alert["severity"], "warning"),
                "timestamp": alert["as_of"],
                "component": f"customer/{alert['customer_id']}"[:255],
                "group": f"ladder/{alert['ladder']}",
                "class": "key-customer-at-risk" if is_at_risk(alert) else "key-customer-downgrade",
                "custom_details": {k: alert[k] for k in (
                    "alert_id", "customer_id", "ladder", "previous_grade", "grade", "grade_change_event_id", "as_of")},
            },
            "client": "gradeflow",
        }
        return Request(self.url, body, dict(JSON))

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request:
        body = {"routing_key": self.routing_key, "event_action": "resolve",
                "dedup_key": self.dedup(recovery["dedup_key"])}
        return Request(self.url, body, dict(JSON))


class AlertmanagerSink(Sink):
    """Prometheus Alertmanager API v2: ``POST /api/v2/alerts`` with a list of alerts.

    Labels identify an alert (same labels on trigger and recovery); the
    trigger carries an ``endsAt`` far ahead (gradeflow does not re-send
    firing alerts), the recovery the same labels with ``endsAt`` = the
    recovery time.
    """

    name = "alertmanager"
    resolves = True

    def __init__(self, base_url: str, source: str, active_s: float) -> None:
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self.source = source
        self.active_s = active_s

    def labels(self, ladder: str, customer_id: str, name: str = "GradeflowKeyCustomerDowngrade") -> dict[str, str]:
        return {"alertname": name, "ladder": ladder, "customer_id": customer_id, "service": self.source}

    def trigger(self, alert: dict[str, Any]) -> Request:
        starts = datetime.fromisoformat(alert["as_of"]).astimezone(timezone.utc)
        name = "GradeflowKeyCustomerDowngrade"
        ends = max(starts, datetime.now(timezone.utc)) + timedelta(seconds=self.active_s)
        if is_at_risk(alert) and alert.get("due_at"):
            # A warning is moot once the drop is due (the downgrade alert, or none if they bought):
            # it ends then (a few minutes ahead at least, so that a late delivery still shows).
            name = "GradeflowKeyCustomerAtRisk"
            due = datetime.fromisoformat(alert["due_at"]).astimezone(timezone.utc)
            ends = max(due, datetime.now(timezone.utc) + timedelta(minutes=5))
        item = {
            "labels": {**self.labels(alert["ladder"], alert["customer_id"], name), "severity": alert["severity"]},
            "annotations": {
                "summary": alert["summary"],
                "previous_grade": alert["previous_grade"],
                "grade": alert["grade"],
                "alert_id": alert["alert_id"],
                "dedup_key": alert["dedup_key"],
            },
            "startsAt": _rfc3339(starts),
            "endsAt": _rfc3339(ends),
            "generatorURL": f"gradeflow://{self.source}/customers/{alert['customer_id']}",
        }
        return Request(self.url, [item], dict(JSON))

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request:
        ends = datetime.fromisoformat(recovery["as_of"]).astimezone(timezone.utc)
        severity = opened_by.partition("|")[2] or "critical"
        item = {
            "labels": {**self.labels(recovery["ladder"], recovery["customer_id"]), "severity": severity},
            "annotations": {"summary": f"Customer {recovery['customer_id']} is back in key grade {recovery['grade']}"},
            "endsAt": _rfc3339(max(ends, datetime.now(timezone.utc) - timedelta(seconds=1))),
            "generatorURL": f"gradeflow://{self.source}/customers/{recovery['customer_id']}",
        }
        return Request(self.url, [item], dict(JSON))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_sinks(settings: Any) -> dict[str, Sink]:
    """The sinks that are configured, by name."""
    sinks: dict[str, Sink] = {}
    if settings.alert_webhook_url:
        sinks["webhook"] = WebhookSink(settings.alert_webhook_url.get_secret_value())
    if settings.alert_slack_webhook_url:
        sinks["slack"] = SlackSink(settings.alert_slack_webhook_url.get_secret_value())
    if settings.alert_pagerduty_routing_key:
        sinks["pagerduty"] = PagerDutySink(settings.alert_pagerduty_url,
                                           settings.alert_pagerduty_routing_key.get_secret_value(),
                                           settings.alert_source)
    if settings.alert_alertmanager_url:
        sinks["alertmanager"] = AlertmanagerSink(settings.alert_alertmanager_url.get_secret_value(), settings.alert_source,
                                                 settings.alert_alertmanager_active_s)
    return sinks


# --------------------------------------------------------------------------- dispatcher

SINK_NAMES = ("webhook", "slack", "pagerduty", "alertmanager")


def check_settings(settings: Any, ruleset: CompiledRuleset) -> dict[str, SeverityRule]:
    """The severity rule of every ladder; :class:`ConfigurationError` if the alert settings cannot work."""
    from schemas.errors import ConfigurationError

    ladders = {lad.name: lad for lad in ruleset.ladders}
    problems = []
    rules = {}
    for name in settings.alert_severity:
        if name not in ladders:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY names ladder {name!r}, which ruleset "
                            f"{ruleset.id} does not have ({', '.join(ladders)})")
    for name, ladder in ladders.items():
        try:
            rule = SeverityRule.from_config(settings.alert_severity.get(name))
        except (TypeError, ValueError) as exc:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY for ladder {name!r}: {exc}")
            continue
        if rule.critical_at_or_below is not None and rule.critical_at_or_below not in ladder.rank:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY for ladder {name!r}: grade {rule.critical_at_or_below!r} "
                            f"is not one of {list(ladder.grades)}")
        rules[name] = rule
    for sev, names in settings.alert_routes.items():
        if sev not in SEVERITIES:
            problems.append(f"GRADEFLOW_ALERT_ROUTES: unknown severity {sev!r} (use {', '.join(SEVERITIES)})")
        for n in names:
            if n not in SINK_NAMES:
                problems.append(f"GRADEFLOW_ALERT_ROUTES: unknown sink {n!r} for {sev!r} (use {', '.join(SINK_NAMES)})")
    if problems:
        raise ConfigurationError("; ".join(problems))
    return rules



Schedule = Callable[[dict[str, Any]], Awaitable[None]]


class Dispatcher:
    """Deliver alerts and recoveries to the configured sinks, once each, never dropping one."""

    def __init__(self, settings: Any, ruleset: CompiledRuleset, redis: Any, prefix: str,
                 schedule: Schedule, metrics: Any = None, sinks: dict[str, Sink] | None = None) -> None:
        self.settings = settings
        self.ruleset = ruleset
        self.redis = redis
        self.prefix = prefix
        self.schedule = schedule  # sends a retry document to the retry topic
        self.metrics = metrics
        self.sinks = build_sinks(settings) if sinks is None else sinks
        self.ladders = {lad.name: lad for lad in ruleset.ladders}
        self.rules = check_settings(settings, ruleset)
        self.token = uuid.uuid4().hex
        self._session: aiohttp.ClientSession | None = None

    # -- plumbing

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.alert_timeout_s))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, "alert", *parts))

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.alert_event(name, **labels)

    def routes(self, sev: str) -> list[str]:
        return [n for n in self.settings.alert_routes.get(sev, []) if n in self.sinks]

    # -- entry points

    async def on_alert(self, alert: dict[str, Any], produced_at: float | None = None) -> None:
        """A document from ``grade-alerts`` (``produced_at``: its record timestamp, epoch seconds):
        set its severity, deliver to the sinks of that severity."""
        max_age = self.settings.alert_max_age_s
        if max_age and produced_at and time.time() - produced_at > max_age:
            log.info("gradeflow: alert %s for %s is %.0fs old (> alert_max_age_s): not sent",
                     alert.get("alert_id"), alert.get("customer_id"), time.time() - produced_at)
            self._count("expired", sink="-")
            return
        ladder = self.ladders.get(alert.get("ladder", ""))
        if ladder is not None and not is_at_risk(alert):
            # A downgrade's severity follows the drop; an at-risk warning keeps its own
            # (GRADEFLOW_AT_RISK_SEVERITY, set by the clock), whatever the drop it warns about.
            alert = {**alert, "severity": severity(ladder, alert["previous_grade"], alert["grade"],
                                                   self.rules[ladder.name])}
        await asyncio.gather(*(self.deliver(TRIGGER, name, alert, 0) for name in self.routes(alert["severity"])))

    async def on_change(self, change: dict[str, Any]) -> None:
        """A document from ``grade-changes``: resolve open incidents when it is a recovery."""
        recovery = recovery_of(change, self.ruleset)
        if recovery is None:
            return
        key = self._k("recovered", recovery["dedup_key"])
        await self.redis.set(key, epoch_us(recovery["as_of"]), px=int(self.settings.alert_dedup_ttl_s * 1000))
        names = [n for n, s in self.sinks.items() if s.resolves]
        await asyncio.gather(*(self.deliver(RESOLVE, n, recovery, 0) for n in names))

    async def on_retry(self, doc: dict[str, Any]) -> None:
        """A document from the retry topic (already due)."""
        self._count("retried", sink=doc["sink"])
        await self.deliver(doc["kind"], doc["sink"], doc["item"], int(doc["round"]))

    # -- delivery

    async def deliver(self, kind: str, sink_name: str, item: dict[str, Any], rounds: int) -> str:
        """Deliver one trigger or resolve to one sink; return what happened (for tests and logs)."""
        sink = self.sinks.get(sink_name)
        if sink is None:
            log.warning("gradeflow: alert sink %s is no longer configured; dropping %s for it", sink_name, kind)
            return "unconfigured"
        ident = item["alert_id"] if kind == TRIGGER else item["recovery_id"]
        dk = item["dedup_key"]
        r = self.redis
        sent_key = self._k("sent", sink_name, ident)
        if await r.exists(sent_key):
            self._count("duplicate", sink=sink_name)
            return "duplicate"
        opened_by = ""
        if kind == TRIGGER:
            recovered = await r.get(self._k("recovered", dk))
            if recovered is not None and int(recovered) >= epoch_us(item["as_of"]):
                self._count("superseded", sink=sink_name)
                return "superseded"
            if self.settings.alert_cooldown_s > 0:
                cd_key = self._k("cooldown", sink_name, dk)
                mark = f"{ident}|{item['severity']}"
                cooldown_ms = int(self.settings.alert_cooldown_s * 1000)
                ok = await r.set(cd_key, mark, nx=True, px=cooldown_ms)
                if not ok:
                    holder_id, _, holder_sev = ((await r.get(cd_key)) or b"").decode().partition("|")
                    if holder_id and holder_id != ident and SEV_RANK.get(item["severity"], 0) > SEV_RANK.get(holder_sev, 0):
                        # Worse than what paged last (warning, then critical): page now.
                        await r.set(cd_key, mark, px=cooldown_ms)
                    elif holder_id and holder_id != ident:
                        wait_ms = await r.pttl(cd_key)
                        self._count("held_back", sink=sink_name)
                        await self._later(kind, sink_name, item, rounds, max(wait_ms, 0) / 1000.0 + 0.05)
                        return "held_back"
        else:
            opened = await r.get(self._k("open", sink_name, dk))
            if opened is None:
                return "nothing_open"
            opened_by = opened.decode()
        lease_ms = int((self.settings.alert_timeout_s + self.settings.alert_backoff_s * 2 ** self.settings.alert_attempts)
                       * self.settings.alert_attempts * 1000) + 5000
        claim_key = self._k("claim", sink_name, ident)
        if not await r.set(claim_key, self.token, nx=True, px=lease_ms):
            # Another worker is delivering it (a rebalance): check again once its lease ends.
            await self._later(kind, sink_name, item, rounds, lease_ms / 1000.0)
            return "claimed_elsewhere"
        request = sink.trigger(item) if kind == TRIGGER else sink.resolve(item, opened_by)
        error: Exception | None = None
        if request is not None:
            for attempt in range(self.settings.alert_attempts):
                try:
                    await self._post(request)
                    error = None
                    break
                except DeliveryError as exc:
                    error = exc
                    self._count("attempt_failed", sink=sink_name)
                    if attempt + 1 < self.settings.alert_attempts:
                        await asyncio.sleep(self.settings.alert_backoff_s * 2 ** attempt)
        if error is None:
            ttl = int(self.settings.alert_dedup_ttl_s * 1000)
            pipe = r.pipeline(transaction=True)
            pipe.set(sent_key, self.token, px=ttl)
            if kind == TRIGGER:
                pipe.set(self._k("open", sink_name, dk), f"{ident}|{item['severity']}", px=ttl)
            else:
                pipe.delete(self._k("open", sink_name, dk))
            pipe.delete(claim_key)
            await pipe.execute()
            self._count("sent", sink=sink_name, kind=kind)
            return "sent"
        await r.delete(claim_key)
        self._count("failed", sink=sink_name)
        delay = min(self.settings.alert_retry_delay_s * 2 ** rounds, self.settings.alert_retry_max_delay_s)
        log.warning("gradeflow: %s to %s failed %d times (%s); retrying in %.0fs via the retry topic",
                    kind, sink_name, self.settings.alert_attempts, error, delay)
        await self._later(kind, sink_name, item, rounds + 1, delay)
        return "failed"

    async def _later(self, kind: str, sink: str, item: dict[str, Any], rounds: int, delay_s: float) -> None:
        await self.schedule({"kind": kind, "sink": sink, "item": item, "round": rounds,
                             "due": time.time() + delay_s})

    async def _post(self, request: Request) -> None:
        session = await self.session()
        try:
            async with session.post(request.url, data=orjson.dumps(request.body), headers=request.headers) as resp:
                if resp.status >= 300:
                    text = (await resp.text())[:200]
                    raise DeliveryError(f"HTTP {resp.status}: {text}")
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
