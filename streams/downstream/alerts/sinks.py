"""The alert sinks: a generic signed webhook, Slack, PagerDuty (Events API v2) and Prometheus
Alertmanager (API v2), each building its requests in the format its vendor publishes.

A sink only builds requests; ``delivery.py`` sends them, retries them and keeps them once-only.
Each sink lists the answers its vendor documents for its endpoint (``statuses``, read by
:func:`~streams.downstream.alerts.policy.classify`) and the secrets never to show
(:meth:`Sink.secrets`): an incoming-webhook URL or a routing key is a credential.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from urllib.parse import quote

from streams.downstream.alerts.policy import PERMANENT, TRANSIENT, is_at_risk, is_storm, rfc3339

PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


@dataclass(frozen=True)
class Request:
    url: str
    body: Any
    headers: dict[str, str]
    # Headers computed from the exact body bytes at each attempt (a signature with a fresh timestamp).
    sign: Callable[[bytes], dict[str, str]] | None = None
    # Several endpoints taking the same body (an HA set of Alertmanagers): posted to each.
    urls: tuple[str, ...] = ()


def secret_value(value: Any) -> str | None:
    """The plain value of a setting that is a ``str`` or a pydantic ``SecretStr`` (or unset)."""
    if value is None:
        return None
    plain = getattr(value, "get_secret_value", lambda: value)()
    return str(plain) if plain else None


SIGNATURE_VERSION = "v1"


def signature_headers(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """``X-Gradeflow-Timestamp`` and ``X-Gradeflow-Signature: v1=<hex>``: HMAC-SHA256 with ``secret``
    over ``<timestamp>.<body>`` (the timestamp lets a receiver refuse a replayed old request)."""
    stamp = str(int(time.time() if now is None else now))
    mac = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Gradeflow-Timestamp": stamp, "X-Gradeflow-Signature": f"{SIGNATURE_VERSION}={mac}"}


class AlertSink(Protocol):
    """What the dispatcher needs of a destination: its name, whether it resolves incidents, how its
    vendor documents refusals, the secrets to keep out of logs, and its requests."""

    name: str
    resolves: bool
    statuses: dict[int, str]

    def secrets(self) -> list[str]: ...

    def trigger(self, alert: dict[str, Any]) -> Request: ...

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request | None: ...


class Sink:
    """One destination; builds the requests in the destination's published format."""

    name = "sink"
    resolves = False
    # The statuses the vendor documents for this endpoint; others follow the generic rule (classify).
    statuses: dict[int, str] = {}

    def secrets(self) -> list[str]:
        """Strings never to show in a log line or a dead letter (keys, secret URLs)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"  # never the URL or key: they are credentials

    def trigger(self, alert: dict[str, Any]) -> Request:
        raise NotImplementedError

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request | None:
        return None


JSON = {"Content-Type": "application/json"}


class WebhookSink(Sink):
    """Generic JSON webhook: the alert document of ``grade-alerts``, as is (severity as dispatched)."""

    name = "webhook"
    # No vendor: the generic HTTP rule (4xx but 408/425/429 permanent, 5xx transient).
    statuses: dict[int, str] = {}

    def __init__(self, url: str, secret: str | None = None) -> None:
        self.url = url
        self._secret = secret.encode() if secret else None

    def __repr__(self) -> str:
        return f"WebhookSink(signed={self._secret is not None})"

    def secrets(self) -> list[str]:
        return [self._secret.decode()] if self._secret else []

    def _sign(self, body: bytes) -> dict[str, str]:
        assert self._secret is not None
        return signature_headers(self._secret, body)

    def trigger(self, alert: dict[str, Any]) -> Request:
        return Request(self.url, alert, dict(JSON), self._sign if self._secret else None)


class SlackSink(Sink):
    """Slack incoming webhook: ``text`` (the fallback and notification line) plus Block Kit blocks."""

    name = "slack"
    resolves = True
    # Slack incoming webhooks: 400 invalid_payload / no_text, 403 action_prohibited, 404 no_service
    # (webhook revoked), 410 channel_is_archived; 429 rate limited with Retry-After; 5xx.
    statuses = {400: PERMANENT, 403: PERMANENT, 404: PERMANENT, 410: PERMANENT, 429: TRANSIENT}
    ICON = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}

    def __init__(self, url: str) -> None:
        self.url = url

    def secrets(self) -> list[str]:
        return [self.url]  # an incoming-webhook URL is its own credential

    def trigger(self, alert: dict[str, Any]) -> Request:
        if is_storm(alert):
            head = f":rotating_light: [ALERT STORM] {alert['count']} pages folded into this one"
        elif is_at_risk(alert):
            head = (f":hourglass: [AT RISK] Customer {alert['customer_id']}: {alert['previous_grade']} → "
                    f"{alert['grade']} on ladder '{alert['ladder']}' at {alert.get('due_at')} unless something changes")
        else:
            head = (f"{self.ICON.get(alert['severity'], '')} [{alert['severity'].upper()}] "
                    f"Customer {alert['customer_id']}: {alert['previous_grade']} → {alert['grade']} "
                    f"on ladder '{alert['ladder']}'").strip()
        body = {
            "text": _slack_escape(head),
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
        return Request(self.url, {"text": _slack_escape(text), "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(text)}}]}, dict(JSON))


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!here>, <@U…>) in every text field: a customer id
    # or a reason must never ping a channel. These three are the escapes Slack documents.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class PagerDutySink(Sink):
    """PagerDuty Events API v2: ``trigger`` with ``dedup_key``; ``resolve`` on recovery."""

    name = "pagerduty"
    resolves = True
    # Events API v2: 202 accepted; 400 invalid event (never accepted as sent); 429 rate limited
    # (per routing key), retry later; 5xx retry.
    statuses = {400: PERMANENT, 429: TRANSIENT}

    def __init__(self, url: str, routing_key: str, source: str) -> None:
        self.url = url
        self.routing_key = routing_key
        self.source = source

    def secrets(self) -> list[str]:
        return [self.routing_key]

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
                "class": ("alert-storm" if is_storm(alert) else
                          "key-customer-at-risk" if is_at_risk(alert) else "key-customer-downgrade"),
                "custom_details": {k: alert[k] for k in (
                    "alert_id", "customer_id", "ladder", "previous_grade", "grade", "grade_change_event_id", "as_of",
                    "count", "folded") if k in alert},
            },
            "client": "gradeflow",
        }
        return Request(self.url, body, dict(JSON))

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request:
        body = {"routing_key": self.routing_key, "event_action": "resolve",
                "dedup_key": self.dedup(recovery["dedup_key"])}
        return Request(self.url, body, dict(JSON))


class AlertmanagerSink(Sink):
    """Prometheus Alertmanager API v2: ``POST /api/v2/alerts`` with a list of alerts, to every
    Alertmanager of an HA set (each keeps its own copy; they share only silences and notifications).

    Labels identify an alert (same labels on trigger and recovery). As a Prometheus server does,
    the dispatcher re-sends every firing alert each ``resend_s`` (:meth:`Dispatcher.resend_firing`)
    with ``endsAt`` a few intervals ahead: an Alertmanager that restarted (it keeps alerts in
    memory only) has them back within one interval, and one that stops hearing of an alert lets it
    end by itself. The recovery sends the same labels with ``endsAt`` = the recovery time.
    """

    name = "alertmanager"
    resolves = True
    # POST /api/v2/alerts: 200 ok, 400 bad request (invalid alerts), 500 internal error.
    statuses = {400: PERMANENT}
    ENDS_AFTER_INTERVALS = 4  # Prometheus: endsAt = 4 x max(resend delay, evaluation interval) ahead

    def __init__(self, base_urls: str | list[str], source: str, resend_s: float, link_base: str) -> None:
        bases = base_urls.split(",") if isinstance(base_urls, str) else base_urls
        self.urls = tuple(b.strip().rstrip("/") + "/api/v2/alerts" for b in bases if b.strip())
        if not self.urls:
            raise ValueError("no Alertmanager URL")
        self.url = self.urls[0]
        self.source = source
        self.resend_s = resend_s
        self.link_base = link_base.rstrip("/")

    def labels(self, ladder: str, customer_id: str, name: str = "GradeflowKeyCustomerDowngrade") -> dict[str, str]:
        return {"alertname": name, "ladder": ladder, "customer_id": customer_id, "service": self.source}

    def link(self, customer_id: str) -> str:
        """The customer in gradeflow's HTTP API (``GET /customers/{customer_id}``, streams/downstream/web.py)."""
        if customer_id == "*":
            return f"{self.link_base}/grades"
        return f"{self.link_base}/customers/{quote(customer_id, safe='')}"

    def ends_at(self, now: float, until: float | None = None) -> str:
        """``endsAt`` of a firing alert sent at ``now``: a few re-send intervals ahead, at most ``until``."""
        ends = now + self.ENDS_AFTER_INTERVALS * self.resend_s
        return rfc3339(datetime.fromtimestamp(ends if until is None else min(ends, until), timezone.utc))

    def firing(self, alert: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
        """The alert as Alertmanager takes it, without ``endsAt``, and when it ends by itself (None: at recovery)."""
        starts = datetime.fromisoformat(alert["as_of"]).astimezone(timezone.utc)
        name = "GradeflowKeyCustomerDowngrade"
        until: float | None = None
        if is_storm(alert):
            name = "GradeflowAlertStorm"
            until = time.time() + self.ENDS_AFTER_INTERVALS * self.resend_s  # one summary, sent once
        elif is_at_risk(alert) and alert.get("due_at"):
            # A warning is moot once the drop is due (the downgrade alert, or none if they bought):
            # it ends then (a few minutes ahead at least, so that a late delivery still shows).
            name = "GradeflowKeyCustomerAtRisk"
            due = datetime.fromisoformat(alert["due_at"]).timestamp()
            until = max(due, time.time() + 300)
        item = {
            "labels": {**self.labels(alert["ladder"], alert["customer_id"], name), "severity": alert["severity"]},
            "annotations": {
                "summary": alert["summary"],
                "previous_grade": alert["previous_grade"],
                "grade": alert["grade"],
                "alert_id": alert["alert_id"],
                "dedup_key": alert["dedup_key"],
            },
            "startsAt": rfc3339(min(starts, datetime.now(timezone.utc))),
            "generatorURL": self.link(alert["customer_id"]),
        }
        return item, until

    def trigger(self, alert: dict[str, Any]) -> Request:
        item, until = self.firing(alert)
        return Request(self.url, [{**item, "endsAt": self.ends_at(time.time(), until)}], dict(JSON), urls=self.urls)

    def resend(self, items: list[dict[str, Any]]) -> Request:
        """Firing alerts again, as :meth:`trigger` sent them (``items``: alert and ``until`` each)."""
        now = time.time()
        body = [{**e["item"], "endsAt": self.ends_at(now, e.get("until"))} for e in items]
        return Request(self.url, body, dict(JSON), urls=self.urls)

    def resolve(self, recovery: dict[str, Any], opened_by: str) -> Request:
        ends = datetime.fromisoformat(recovery["as_of"]).astimezone(timezone.utc)
        severity = opened_by.partition("|")[2] or "critical"
        item = {
            "labels": {**self.labels(recovery["ladder"], recovery["customer_id"]), "severity": severity},
            "annotations": {"summary": f"Customer {recovery['customer_id']} is back in key grade {recovery['grade']}"},
            "endsAt": rfc3339(min(ends, datetime.now(timezone.utc) - timedelta(seconds=1))),
            "generatorURL": self.link(recovery["customer_id"]),
        }
        return Request(self.url, [item], dict(JSON), urls=self.urls)


def api_base_url(settings: Any) -> str:
    """Where on-call reaches gradeflow's HTTP API: ``GRADEFLOW_ALERT_LINK_BASE_URL``, else the
    worker's own address (a wildcard bind address replaced by the host name)."""
    if settings.alert_link_base_url:
        return str(settings.alert_link_base_url).rstrip("/")
    host = settings.web_host
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.web_port}"


def build_sinks(settings: Any) -> dict[str, AlertSink]:
    """The sinks that are configured, by name."""
    sinks: dict[str, AlertSink] = {}
    # The URLs and keys may be plain strings or SecretStr settings: secret_value reads both.
    webhook = secret_value(settings.alert_webhook_url)
    if webhook:
        sinks["webhook"] = WebhookSink(webhook, secret_value(settings.alert_webhook_secret))
    slack = secret_value(settings.alert_slack_webhook_url)
    if slack:
        sinks["slack"] = SlackSink(slack)
    routing_key = secret_value(settings.alert_pagerduty_routing_key)
    if routing_key:
        sinks["pagerduty"] = PagerDutySink(settings.alert_pagerduty_url, routing_key, settings.alert_source)
    alertmanager = secret_value(settings.alert_alertmanager_url)
    if alertmanager:
        sinks["alertmanager"] = AlertmanagerSink(alertmanager, settings.alert_source,
                                                 settings.alert_alertmanager_resend_s, api_base_url(settings))
    return sinks
