"""Key-customer alerts delivered to on-call: the dispatcher, retries, rate limits, dead letters, once-only delivery.

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
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential,
                      wait_random)

from rules.engine import CompiledRuleset
from streams.downstream.alerts.policy import (PERMANENT, SEV_RANK, StormGuard, cause_of, check_settings, classify,
                                              SeverityRule, is_at_risk, is_storm, recovery_of, retry_after_s, severity)
from streams.downstream.alerts.sinks import AlertmanagerSink, AlertSink, Request, build_sinks
from streams.downstream.redis_grades import epoch_us

log = logging.getLogger("gradeflow.alerts")

TRIGGER, RESOLVE, STORM_SUMMARY = "trigger", "resolve", "storm_summary"
EXCERPT_CHARS = 500


def rate_limiter(rate_per_min: float) -> AsyncLimiter:
    """A leaky bucket letting ``rate_per_min`` requests a minute through, evenly: a burst of at
    most one second's worth (one request at least), so that a storm does not hit the vendor's
    limit in its first second."""
    burst = max(1.0, rate_per_min / 60.0)
    return AsyncLimiter(burst, 60.0 * burst / rate_per_min)


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


# --------------------------------------------------------------------------- dispatcher


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
        self.storm = StormGuard(settings.alert_storm_threshold, settings.alert_storm_window_s,
                                bool(getattr(settings, "alert_fold_rules_changes", False)))
        self.limiters = {name: rate_limiter(getattr(settings, f"alert_{name}_rate_per_min")) for name in self.sinks}
        self._session: aiohttp.ClientSession | None = None

    def switch(self, ruleset: CompiledRuleset) -> None:
        """Read alerts by ``ruleset``'s ladders from now on (a promotion); a ladder the alert
        settings do not name gets the default severity rule."""
        self.ruleset = ruleset
        self.ladders = {lad.name: lad for lad in ruleset.ladders}
        self.rules = {name: self.rules.get(name, SeverityRule()) for name in self.ladders}

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
        if routes and self.storm.folds_rules and cause_of(alert, self.ruleset) == "rules":
            # A promotion moves many customers at once, on purpose: one summary per ladder and
            # window says what it did, instead of a page per customer.
            await self._fold_rules(alert)
            self._count("folded", sink="-")
            return
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

    async def _fold_rules(self, alert: dict[str, Any]) -> None:
        """Count a page caused by a ruleset change in its ladder's summary of this window (the
        first of a ladder and window schedules that summary, due when the window ends)."""
        r = self.redis
        ttl = int(self.storm.window_s * 2000) + 60_000
        member = self._k("storm", "member", alert["alert_id"])
        if not await r.set(member, b"fold", px=ttl, nx=True):
            return  # a redelivery: counted already (or paged, if it came before folding was on)
        window = self.storm.window(time.time())
        ladder = alert["ladder"]
        folded_key = self._k("storm", str(window), "rules", ladder)
        pipe = r.pipeline(transaction=True)
        pipe.hincrby(folded_key, alert["severity"], 1)
        pipe.pexpire(folded_key, ttl)
        pipe.set(self._k("storm", str(window), "rules", ladder, "scheduled"), b"1", px=ttl, nx=True)
        first = (await pipe.execute())[2]
        if first:
            await self.schedule({"kind": STORM_SUMMARY, "sink": "*", "item": {"window": window, "ladder": ladder},
                                 "round": 0, "due": self.storm.bounds(window)[1] + 1.0})

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

    async def rules_summary(self, window: int, ladder: str) -> dict[str, Any] | None:
        """The summary of the pages a ruleset change caused on ``ladder`` in ``window`` (None: none)."""
        raw = await self.redis.hgetall(self._k("storm", str(window), "rules", ladder))
        by_severity = {(k.decode() if isinstance(k, bytes) else k): int(n) for k, n in raw.items()}
        if not by_severity:
            return None
        return self.storm.rules_summary(window, ladder, by_severity, self.settings.alert_source)

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
            ladder = doc["item"].get("ladder")
            summary = (await self.storm_summary(int(doc["item"]["window"])) if ladder is None
                       else await self.rules_summary(int(doc["item"]["window"]), ladder))
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
