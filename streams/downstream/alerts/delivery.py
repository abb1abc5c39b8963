"""Key-customer alerts delivered to on-call: sinks, severity, retries, once-only delivery.

The ``alert-dispatcher`` agent (streams/downstream/wiring.py) reads ``grade-alerts``
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

Each sink's refusals are classified as its vendor documents them (:func:`classify`). A
permanent one (the request itself is wrong, or its target gone: PagerDuty 400, Slack 410 …)
goes to the alert dead-letter topic and is marked done: never retried. A transient one is
retried in line (tenacity: jittered exponential back-off, ``Retry-After`` honoured) up to
``alert_attempts`` tries, then goes to the retry topic with a due time and is tried again,
round after round with a growing (capped, jittered) delay: never dropped, nothing lost across
a crash (the topic holds it). A trigger held back by the cooldown goes there too, due when the
cooldown ends; if the customer recovered meanwhile it is superseded. Only a crash between a
sink's answer and the ``sent`` mark can deliver twice; PagerDuty (dedup_key) and Alertmanager
(labels) merge such a repeat into the same incident.

Each sink has a request rate (:func:`rate_limiter`); past ``alert_storm_threshold`` pages in a
window, further pages are folded into one summary alert per window (:class:`StormGuard`).
Alertmanager's firing alerts are re-sent every interval until resolved
(:meth:`Dispatcher.resend_firing`, the set in ``P:alert:firing:alertmanager``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential,
                      wait_random)

from rules.changes import Cause, change_id
from rules.engine import CompiledLadder, CompiledRuleset
from streams.downstream.redis_grades import epoch_us

log = logging.getLogger("gradeflow.alerts")

TRIGGER, RESOLVE, STORM_SUMMARY = "trigger", "resolve", "storm_summary"
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


def is_storm(alert: dict[str, Any]) -> bool:
    """Whether ``alert`` is the summary of an alert storm (:class:`StormGuard`), not one customer's."""
    return alert.get("kind") == "storm"


def cause_of(alert: dict[str, Any], ruleset: CompiledRuleset) -> str:
    """What made the alert: ``clock`` (time alone), ``rules`` (a new ruleset) or ``event`` (a
    transaction or interaction).

    The alert carries no cause, but its ``grade_change_event_id`` is the change's deterministic id
    (rules/changes.py ``change_id``), which for the clock and the rules is made of what the alert
    holds: rebuilding it tells them apart without reading grade-changes (not ordered with alerts).
    """
    if is_at_risk(alert):
        return "clock"
    try:
        as_of = datetime.fromisoformat(alert["as_of"])
        for kind in ("clock", "rules"):
            if change_id(alert["customer_id"], alert["ladder"], ruleset, Cause(kind, None), as_of,
                         alert["previous_grade"], alert["grade"]) == alert.get("grade_change_event_id"):
                return kind
    except (KeyError, TypeError, ValueError):
        pass
    return "event"


@dataclass(frozen=True)
class StormGuard:
    """Past ``threshold`` pages in a window (all customers together), further pages of that window
    are folded: not sent, counted by ladder, cause and severity, and summed up in one summary alert
    sent when the window ends. ``threshold`` 0: never fold."""

    threshold: int
    window_s: float

    def window(self, now: float) -> int:
        return int(now // self.window_s)

    def bounds(self, window: int) -> tuple[float, float]:
        return window * self.window_s, (window + 1) * self.window_s

    def folds(self, count: int) -> bool:
        """Whether the ``count``-th page of a window is folded."""
        return self.threshold > 0 and count > self.threshold

    def summary(self, window: int, folded: dict[tuple[str, str, str], int], source: str) -> dict[str, Any]:
        """The summary alert of ``window``: ``folded`` counts pages by (ladder, cause, severity)."""
        start, end = (datetime.fromtimestamp(t, timezone.utc) for t in self.bounds(window))
        total = sum(folded.values())
        ladders = sorted({ladder for ladder, _, _ in folded})
        by_cause: dict[str, int] = {}
        for (_ladder, cause, _sev), n in folded.items():
            by_cause[cause] = by_cause.get(cause, 0) + n
        worst = max((sev for _, _, sev in folded), key=lambda v: SEV_RANK.get(v, 0), default="critical")
        parts = ", ".join(f"{n} on ladder '{ladder}' caused by {CAUSE_WORDS.get(cause, cause)}"
                          for (ladder, cause, _), n in sorted(folded.items()))
        ident = uuid.uuid5(uuid.NAMESPACE_URL, f"gradeflow/{source}/alert-storm/{window}/{self.window_s}")
        return {
            "schema_version": 1,
            "kind": "storm",
            "alert_id": str(ident),
            "customer_id": "*",
            "ladder": ",".join(ladders),
            "severity": worst,
            "summary": (f"Alert storm: {total} more key-customer pages between {_rfc3339(start)} and "
                        f"{_rfc3339(end)} than the {self.threshold} sent were folded into this one: {parts}. "
                        f"Every alert is on the alerts topic."),
            "previous_grade": "",
            "grade": "",
            "grade_change_event_id": "",
            "as_of": end.isoformat(),
            "dedup_key": f"gradeflow/alert-storm/{_rfc3339(start)}",
            "count": total,
            "causes": by_cause,
            "folded": [{"ladder": ladder, "cause": cause, "severity": sev, "count": n}
                       for (ladder, cause, sev), n in sorted(folded.items())],
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
        }


CAUSE_WORDS = {"clock": "the clock (time alone)", "rules": "a new ruleset", "event": "transactions or interactions"}


def rate_limiter(rate_per_min: float) -> AsyncLimiter:
    """A leaky bucket letting ``rate_per_min`` requests a minute through, evenly: a burst of at
    most one second's worth (one request at least), so that a storm does not hit the vendor's
    limit in its first second."""
    burst = max(1.0, rate_per_min / 60.0)
    return AsyncLimiter(burst, 60.0 * burst / rate_per_min)


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


PERMANENT, TRANSIENT = "permanent", "transient"
# Answers a retry cannot change whatever the vendor: the request itself is wrong (or gone).
_TRANSIENT_4XX = (408, 425, 429)
EXCERPT_CHARS = 500


def classify(documented: dict[int, str], status: int | None) -> str:
    """PERMANENT or TRANSIENT for an answer ``status`` (None: no answer at all), given what the
    vendor documents for its endpoint (``documented``); a status it does not list follows the
    generic HTTP rule: 4xx but 408/425/429 permanent, everything else transient."""
    if status is None:
        return TRANSIENT  # refused, reset, timed out: the sink may be back in a moment
    if status in documented:
        return documented[status]
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        return PERMANENT
    # 5xx, 408/425/429, and the odd 1xx/3xx: not the request's fault, so never dropped.
    return TRANSIENT


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3);
    None when absent or unreadable, 0 for a date already past."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced (a sink may echo a key or URL back in its answer)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class DeliveryError(Exception):
    """A sink did not accept a message; ``permanent`` when retrying cannot help (see :func:`classify`)."""

    def __init__(self, message: str, *, status: int | None = None, excerpt: str = "",
                 retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt
        self.retry_after = retry_after
        self.permanent = permanent


def dead_letter_doc(kind: str, sink: str, item: dict[str, Any], error: DeliveryError,
                    at: datetime | None = None) -> dict[str, Any]:
    """The value put on the alert dead-letter topic for a delivery a sink refused for good."""
    return {
        "schema_version": 1,
        "action": kind,  # trigger: ``alert`` is the grade-alerts document; resolve: the recovery
        "sink": sink,
        "status": error.status,
        "error": str(error),
        "response_excerpt": error.excerpt,
        "dead_lettered_at": (at or datetime.now(timezone.utc)).isoformat(),
        "alert": item,
    }


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
        return _rfc3339(datetime.fromtimestamp(ends if until is None else min(ends, until), timezone.utc))

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
            "startsAt": _rfc3339(min(starts, datetime.now(timezone.utc))),
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
            "endsAt": _rfc3339(min(ends, datetime.now(timezone.utc) - timedelta(seconds=1))),
            "generatorURL": self.link(recovery["customer_id"]),
        }
        return Request(self.url, [item], dict(JSON), urls=self.urls)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
                 schedule: Schedule, metrics: Any = None, sinks: dict[str, AlertSink] | None = None, *,
                 dead_letter: Schedule) -> None:
        self.settings = settings
        self.ruleset = ruleset
        self.redis = redis
        self.prefix = prefix
        self.schedule = schedule  # sends a retry document to the retry topic
        self.dead_letter = dead_letter  # sends a refused delivery to the alert dead-letter topic
        self.metrics = metrics
        self.sinks = build_sinks(settings) if sinks is None else sinks
        self.ladders = {lad.name: lad for lad in ruleset.ladders}
        self.rules = check_settings(settings, ruleset)
        self.token = uuid.uuid4().hex
        self.storm = StormGuard(settings.alert_storm_threshold, settings.alert_storm_window_s)
        self.limiters = {name: rate_limiter(getattr(settings, f"alert_{name}_rate_per_min")) for name in self.sinks}
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
        routes = self.routes(alert["severity"])
        if routes and self.storm.threshold > 0 and await self._storm_folds(alert):
            self._count("folded", sink="-")
            return
        await asyncio.gather(*(self.deliver(TRIGGER, name, alert, 0) for name in routes))

    async def _storm_folds(self, alert: dict[str, Any]) -> bool:
        """Count ``alert`` as a page of this storm window; True when it is folded instead of sent.

        Counts live in Redis, so the threshold holds across workers. A replayed alert keeps the
        decision made the first time (``storm:member``); the first fold of a window puts the
        window's summary on the retry topic, due when the window ends, so it survives a crash.
        """
        r = self.redis
        ttl = int(self.storm.window_s * 2000) + 60_000
        member = self._k("storm", "member", alert["alert_id"])
        prior = await r.get(member)
        if prior is not None:
            return bool(prior == b"fold")
        window = self.storm.window(time.time())
        count_key = self._k("storm", str(window), "count")
        pipe = r.pipeline(transaction=True)
        pipe.incr(count_key)
        pipe.pexpire(count_key, ttl)
        count = int((await pipe.execute())[0])
        folds = self.storm.folds(count)
        await r.set(member, b"fold" if folds else b"page", px=ttl)
        if not folds:
            return False
        folded_key = self._k("storm", str(window), "folded")
        field = "\x1f".join((alert["ladder"], cause_of(alert, self.ruleset), alert["severity"]))
        pipe = r.pipeline(transaction=True)
        pipe.hincrby(folded_key, field, 1)
        pipe.pexpire(folded_key, ttl)
        await pipe.execute()
        if count == self.storm.threshold + 1:
            # One second after the window: a fold counted at its very end is in the sum.
            await self.schedule({"kind": STORM_SUMMARY, "sink": "*", "item": {"window": window},
                                 "round": 0, "due": self.storm.bounds(window)[1] + 1.0})
        return True

    async def storm_summary(self, window: int) -> dict[str, Any] | None:
        """The summary alert of a storm window, from the folded counts in Redis (None: nothing folded)."""
        raw = await self.redis.hgetall(self._k("storm", str(window), "folded"))
        folded: dict[tuple[str, str, str], int] = {}
        for field, n in raw.items():
            ladder, cause, sev = (field.decode() if isinstance(field, bytes) else field).split("\x1f")
            folded[(ladder, cause, sev)] = int(n)
        if not folded:
            return None
        return self.storm.summary(window, folded, self.settings.alert_source)

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
        if doc["kind"] == STORM_SUMMARY:
            summary = await self.storm_summary(int(doc["item"]["window"]))
            if summary is not None:
                await asyncio.gather(*(self.deliver(TRIGGER, name, summary, 0)
                                       for name in self.routes(summary["severity"])))
            return
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
        lease_ms = int(self.settings.alert_attempts * (self.settings.alert_timeout_s + 2 * self._inline_cap_s())
                       * 1000) + 5000
        claim_key = self._k("claim", sink_name, ident)
        if not await r.set(claim_key, self.token, nx=True, px=lease_ms):
            # Another worker is delivering it (a rebalance): check again once its lease ends.
            await self._later(kind, sink_name, item, rounds, lease_ms / 1000.0)
            return "claimed_elsewhere"
        request = sink.trigger(item) if kind == TRIGGER else sink.resolve(item, opened_by)
        error: DeliveryError | None = None
        if request is not None:
            try:
                await self._send(sink, request)
            except DeliveryError as exc:
                error = exc
        ttl = int(self.settings.alert_dedup_ttl_s * 1000)
        if error is None:
            pipe = r.pipeline(transaction=True)
            pipe.set(sent_key, self.token, px=ttl)
            if kind == TRIGGER:
                pipe.set(self._k("open", sink_name, dk), f"{ident}|{item['severity']}", px=ttl)
            else:
                pipe.delete(self._k("open", sink_name, dk))
            pipe.delete(claim_key)
            await pipe.execute()
            if isinstance(sink, AlertmanagerSink):
                await self._firing_update(kind, sink, item)
            self._count("sent", sink=sink_name, kind=kind)
            return "sent"
        if error.permanent:
            # The sink said the request itself is wrong (or its target gone): repeating it cannot
            # help, so it is kept on the dead-letter topic and marked done, never retried.
            await self.dead_letter(dead_letter_doc(kind, sink_name, item, error))
            pipe = r.pipeline(transaction=True)
            pipe.set(sent_key, "dead-letter", px=ttl)
            pipe.delete(claim_key)
            await pipe.execute()
            if kind == TRIGGER:
                await self._release_cooldown(sink_name, dk, ident)
            self._count("dead_lettered", sink=sink_name)
            log.error("gradeflow: %s to %s refused for good (%s); kept on the alert dead-letter topic",
                      kind, sink_name, error)
            return "dead_lettered"
        await r.delete(claim_key)
        self._count("failed", sink=sink_name)
        delay = round_delay(rounds, self.settings.alert_retry_delay_s, self.settings.alert_retry_max_delay_s)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.settings.alert_retry_max_delay_s))
        log.warning("gradeflow: %s to %s failed (%s); retrying in %.0fs via the retry topic",
                    kind, sink_name, error, delay)
        await self._later(kind, sink_name, item, rounds + 1, delay)
        return "failed"

    # -- Alertmanager: firing alerts re-sent until resolved

    async def _firing_update(self, kind: str, sink: "AlertmanagerSink", item: dict[str, Any]) -> None:
        """Keep the set of firing alerts (``P:alert:firing:<sink>``, a hash by dedup_key) in step:
        a trigger adds its alert, a resolve removes it. It lives in Redis beside the ``open`` marks,
        so a restarted worker re-sends the same set; bounded by GRADEFLOW_ALERT_ALERTMANAGER_MAX_FIRING."""
        key = self._k("firing", sink.name)
        if kind != TRIGGER:
            await self.redis.hdel(key, item["dedup_key"])
            return
        if is_storm(item):
            return  # a summary is sent once and ends by itself
        entry, until = sink.firing(item)
        # No longer than the open mark: a resolve after that finds nothing to resolve.
        expires = time.time() + self.settings.alert_dedup_ttl_s
        doc = orjson.dumps({"item": entry, "until": min(until, expires) if until is not None else expires})
        if await self.redis.hexists(key, item["dedup_key"]) or \
                await self.redis.hlen(key) < self.settings.alert_alertmanager_max_firing:
            await self.redis.hset(key, item["dedup_key"], doc)
        else:
            self._count("firing_full", sink=sink.name)
            log.warning("gradeflow: %d alerts already firing in %s; %s is sent once, not re-sent",
                        self.settings.alert_alertmanager_max_firing, sink.name, item["dedup_key"])

    async def resend_firing(self, batch: int = 500) -> int:
        """Re-send every firing alert to each Alertmanager, once per interval across the workers
        (a Redis lease); drop those past their end. Return how many were sent (0: not this worker's turn)."""
        sent = 0
        for name, sink in self.sinks.items():
            if not isinstance(sink, AlertmanagerSink):
                continue
            lease = self._k("resend", name)
            if not await self.redis.set(lease, self.token, nx=True,
                                        px=max(int(self.settings.alert_alertmanager_resend_s * 900), 1)):
                continue
            key = self._k("firing", name)
            now = time.time()
            entries: list[dict[str, Any]] = []
            ended: list[bytes] = []
            async for field, raw in self.redis.hscan_iter(key, count=batch):
                entry = orjson.loads(raw)
                if entry.get("until") is not None and entry["until"] <= now:
                    ended.append(field)
                else:
                    entries.append(entry)
            if ended:
                await self.redis.hdel(key, *ended)
            for i in range(0, len(entries), batch):
                try:
                    await self._send(sink, sink.resend(entries[i:i + batch]))
                    sent += len(entries[i:i + batch])
                except DeliveryError as exc:
                    # The next interval tries again; until then the alerts stay up (endsAt ahead).
                    self._count("resend_failed", sink=name)
                    log.warning("gradeflow: re-sending %d firing alerts to %s failed (%s)",
                                len(entries[i:i + batch]), name, exc)
        return sent

    async def resend_loop(self) -> None:
        """Re-send firing alerts every GRADEFLOW_ALERT_ALERTMANAGER_RESEND_S, until cancelled."""
        while True:
            await asyncio.sleep(self.settings.alert_alertmanager_resend_s)
            try:
                await self.resend_firing()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: the next interval tries again
                log.warning("gradeflow: re-sending firing alerts failed (%s: %s)", type(exc).__name__, exc)

    def _inline_cap_s(self) -> float:
        """The longest wait between two attempts in line; a longer Retry-After goes to the retry topic."""
        return float(self.settings.alert_backoff_s * 2 ** self.settings.alert_attempts)

    async def _release_cooldown(self, sink_name: str, dk: str, ident: str) -> None:
        """Nothing paged: a later drop of the same customer must not wait for this one's cooldown."""
        key = self._k("cooldown", sink_name, dk)
        held = await self.redis.get(key)
        if held is not None and held.decode().partition("|")[0] == ident:
            await self.redis.delete(key)

    async def _send(self, sink: AlertSink, request: Request) -> None:
        """POST ``request`` to its endpoint, or to each of its ``urls``: delivered when one accepted
        (an Alertmanager that missed it gets it at the next re-send); else raise the error most worth
        retrying."""
        if not request.urls:
            await self._send_one(sink, request)
            return
        results = await asyncio.gather(*(self._send_one(sink, replace(request, url=u)) for u in request.urls),
                                       return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        for e in errors:
            if not isinstance(e, DeliveryError):
                raise e
        if len(errors) < len(results):
            if errors:
                log.warning("gradeflow: %d of %d %s endpoints failed (%s)", len(errors), len(results), sink.name,
                            errors[0])
            return
        raise next((e for e in errors if isinstance(e, DeliveryError) and not e.permanent), errors[0])

    async def _send_one(self, sink: AlertSink, request: Request) -> None:
        """POST ``request``, retried in line (tenacity: jittered exponential back-off, Retry-After
        honoured) while the failure is transient and its wait short; raise the last DeliveryError."""
        cap = self._inline_cap_s()

        def in_line(exc: BaseException) -> bool:
            return (isinstance(exc, DeliveryError) and not exc.permanent
                    and (exc.retry_after is None or exc.retry_after <= cap))

        backoff = self.settings.alert_backoff_s
        jitter = wait_exponential(multiplier=backoff, max=cap) + wait_random(0, backoff)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            after = getattr(exc, "retry_after", None)
            return max(jitter(state), after) if after is not None else jitter(state)

        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.settings.alert_attempts), wait=wait,
                                           retry=retry_if_exception(in_line), reraise=True):
            with attempt:
                try:
                    await self._post(sink, request)
                except DeliveryError:
                    self._count("attempt_failed", sink=sink.name)
                    raise

    async def _later(self, kind: str, sink: str, item: dict[str, Any], rounds: int, delay_s: float) -> None:
        await self.schedule({"kind": kind, "sink": sink, "item": item, "round": rounds,
                             "due": time.time() + delay_s})

    async def _post(self, sink: AlertSink, request: Request) -> None:
        session = await self.session()
        secrets = sink.secrets()
        limiter = self.limiters.get(sink.name)
        if limiter is not None:
            await limiter.acquire()
        try:
            body = orjson.dumps(request.body)
            headers = {**request.headers, **request.sign(body)} if request.sign is not None else request.headers
            async with session.post(request.url, data=body, headers=headers) as resp:
                if resp.status >= 300:
                    excerpt = redact((await resp.text(errors="replace"))[:EXCERPT_CHARS], secrets)
                    verdict = classify(sink.statuses, resp.status)
                    raise DeliveryError(f"HTTP {resp.status}: {excerpt[:200]}", status=resp.status, excerpt=excerpt,
                                        retry_after=retry_after_s(resp.headers.get("Retry-After")),
                                        permanent=verdict == PERMANENT)
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DeliveryError(redact(f"{type(exc).__name__}: {exc}", secrets)) from None


def round_delay(rounds: int, first_s: float, cap_s: float) -> float:
    """Delay before retry round ``rounds`` + 1 on the retry topic: exponential, capped, with jitter
    (half to all of it) so that deliveries failed together do not come back together."""
    return min(first_s * 2 ** rounds, cap_s) * random.uniform(0.5, 1.0)
