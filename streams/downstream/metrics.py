"""Prometheus metrics of one worker (prometheus-client), served at ``GET /metrics``.

Each app has its own registry (several apps may live in one process in tests).
What the grading agent already counts (streams/app.py ``Counters``) is read at
scrape time, so the hot path does no extra work per event; the one call the
agent makes per batch is :func:`observe_batch` (O(1): one histogram sample).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streams.faustext.recovery import standby_progress

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _CountersCollector:
    """Exposes the grading agent's running totals (streams.app.Counters) as counters."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        c = getattr(self.app, "gradeflow_counters", None)
        if c is None:
            return
        by_topic = CounterMetricFamily("gradeflow_events_consumed", "Input records consumed by the grading agent.",
                                       labels=["topic"])
        for topic, n in sorted(c.by_topic.items()):
            by_topic.add_metric([topic], n)
        yield by_topic
        for name, value, text in (
            ("gradeflow_events_applied", c.applied, "Input events applied to customer state."),
            ("gradeflow_events_dead_lettered", c.dead_lettered, "Input records sent to the dead-letter topic."),
            ("gradeflow_events_replayed", c.replayed,
             "Input records skipped because their offset was already applied (replays after a crash or rebalance)."),
            ("gradeflow_events_duplicate", getattr(c, "duplicates", 0),
             "Input records skipped because their event_id was already applied (producer retries, re-sent events)."),
            ("gradeflow_events_refused", getattr(c, "refused", 0),
             "Input records of erased customers from before their erasure, refused (docs/erasure.md)."),
            ("gradeflow_events_forwarded", getattr(c, "forwarded", 0),
             "Input records of customer ids merged into another, sent on to it (docs/customers.md)."),
            ("gradeflow_grade_changes_emitted", c.grade_changes, "Grade-change events emitted by the grading agent."),
            ("gradeflow_alerts_emitted", c.alerts, "Alerts emitted to grade-alerts by the grading agent."),
        ):
            yield CounterMetricFamily(name, text, value=value)
        # consumed = applied + duplicates + replayed + dead_lettered + refused + forwarded, always: anything else is a bug.
        yield GaugeMetricFamily(
            "gradeflow_events_unreconciled",
            "consumed - (applied + duplicate + replayed + dead_lettered + refused + forwarded); always 0 when every record is accounted for.",
            value=unreconciled(c))


def unreconciled(c: Any) -> int:
    """Records consumed but in none of the six outcomes (``streams.app.Counters``); 0 unless there is a bug."""
    return c.consumed - (c.applied + getattr(c, "duplicates", 0) + c.replayed + c.dead_lettered + getattr(c, "refused", 0)
                         + getattr(c, "forwarded", 0))


class _LagCollector:
    """Consumer lag per assigned partition: high watermark minus the next offset to commit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        lag = GaugeMetricFamily("gradeflow_consumer_lag", "Records not yet processed, per assigned partition.",
                                labels=["topic", "partition"])
        try:
            consumer = self.app.consumer
            committed = consumer._committed_offset  # noqa: SLF001 - Faust keeps no public accessor
            for tp in sorted(consumer.assignment()):
                if tp.topic.endswith("-changelog") or "__assignor" in tp.topic:
                    continue  # Faust's own topics: read for recovery, never committed
                try:
                    high = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - no fetch yet for this partition
                    continue
                if high is None:
                    continue
                done = committed.get(tp)
                lag.add_metric([tp.topic, str(tp.partition)], max(0, high - (done + 1 if done is not None else 0)))
        except Exception:  # noqa: BLE001 - before the consumer started
            pass
        yield lag


class _StandbyCollector:
    """How far each standby copy of the state table has read its changelog partition."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        position = GaugeMetricFamily("gradeflow_standby_position",
                                     "Next changelog offset a standby copy of the state will read, per partition.",
                                     labels=["topic", "partition"])
        lag = GaugeMetricFamily("gradeflow_standby_lag",
                                "Changelog records a standby copy has still to read (end as of the last fetch).",
                                labels=["topic", "partition"])
        for (topic, partition), (at, high) in sorted(standby_progress(self.app).items()):
            position.add_metric([topic, str(partition)], at)
            if high is not None:
                lag.add_metric([topic, str(partition)], max(0, high - at))
        yield position
        yield lag


class _RulesCollector:
    """The active ruleset and the re-grade after a promotion (streams/rules_control.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        rules = getattr(self.app, "gradeflow_rules", None)
        if rules is None:
            return
        status = rules.status()
        sweep = status["regrade"]
        info = GaugeMetricFamily("gradeflow_rules_active", "1 for the ruleset this worker grades by.",
                                 labels=["ruleset", "version"])
        info.add_metric([status["active"]["id"], status["active"]["version"]], 1)
        yield info
        for name, value, text in (
            ("gradeflow_rules_control_version", status["control_version"],
             "The rules-control record in force on this worker (0: none, GRADEFLOW_RULESET)."),
            ("gradeflow_rules_regrade_customers_total", sweep["customers_total"],
             "Customers of this worker's partitions to examine in the current (or last) re-grade."),
            ("gradeflow_rules_regrade_customers_done", sweep["customers_done"],
             "Of those, examined so far."),
            ("gradeflow_rules_regrade_complete", int(status["regrade_complete"]),
             "1 once every customer of this worker's partitions is graded by the active ruleset."),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        if sweep["eta_s"] is not None:
            yield GaugeMetricFamily("gradeflow_rules_regrade_eta_seconds",
                                    "Seconds left in the re-grade at its rate so far (absent when none runs).",
                                    value=sweep["eta_s"])
        yield CounterMetricFamily("gradeflow_rules_switches", "Ruleset switches by rules-control records.",
                                  value=status["switches"])
        yield CounterMetricFamily("gradeflow_rules_refused",
                                  "rules-control records this worker could not apply (see its log).",
                                  value=status["refused"])


class StateGauge:
    """A gauge without a sample until its first :meth:`set`: a state not yet known is not shown as 0."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        family = GaugeMetricFamily(self.name, self.text)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class Metrics:
    """The registry and the metrics the downstream agents update."""

    def __init__(self, app: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        r.register(_CountersCollector(app))
        r.register(_LagCollector(app))
        r.register(_StandbyCollector(app))
        from streams.shadow import ShadowCollector

        r.register(ShadowCollector(app))  # gradeflow_shadow_*: only with shadow rulesets
        r.register(_RulesCollector(app))
        self.latency = Histogram(
            "gradeflow_processing_latency_seconds",
            "Per grading batch: from the broker timestamp of its first record to the grade decision.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batches = Counter("gradeflow_batches", "Batches processed by the grading agent.", registry=r)
        self.changes = Counter("gradeflow_grade_changes", "Grade changes seen on grade-changes, by ladder and direction.",
                               ["ladder", "direction"], registry=r)
        self.redis_writes = Counter("gradeflow_redis_writes", "Grade changes applied to Redis, by result.",
                                    ["result"], registry=r)
        self.redis_errors = Counter("gradeflow_redis_errors", "Failed Redis round trips of the redis-writer (retried).",
                                    registry=r)
        self.redis_up = StateGauge("gradeflow_redis_up",
                                   "1 while Redis answers, 0 while it does not (current grades and alert "
                                   "de-duplication wait; grading goes on); no sample before the first attempt.")
        r.register(self.redis_up)
        self.grade_counts = Gauge("gradeflow_customers_by_grade", "Customers currently in each grade (from Redis).",
                                  ["ladder", "grade"], registry=r)
        self.alerts_sent = Counter("gradeflow_alerts_sent", "Alert messages delivered, by sink and kind.",
                                   ["sink", "kind"], registry=r)
        self.alerts_failed = Counter("gradeflow_alerts_failed",
                                     "Alert deliveries that failed every attempt in line and went to the retry topic.",
                                     ["sink"], registry=r)
        self.alert_outcomes = Counter("gradeflow_alert_outcomes",
                                      "Other outcomes of alert deliveries (attempt_failed, duplicate, held_back, "
                                      "superseded, retried).", ["sink", "outcome"], registry=r)

    def observe_batch(self, first_timestamp_ms: int | None) -> None:
        self.batches.inc()
        if first_timestamp_ms:
            self.latency.observe(max(0.0, time.time() - first_timestamp_ms / 1000.0))

    def alert_event(self, name: str, sink: str, kind: str = "trigger") -> None:
        if name == "sent":
            self.alerts_sent.labels(sink, kind).inc()
        elif name == "failed":
            self.alerts_failed.labels(sink).inc()
        else:
            self.alert_outcomes.labels(sink, name).inc()

    def set_grade_counts(self, counts: dict[str, dict[str, int]]) -> None:
        for ladder, grades in counts.items():
            for grade, n in grades.items():
                self.grade_counts.labels(ladder, grade).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_batch(app: Any, records: list[Any]) -> None:
    """Called by the grading agent once per batch: O(1), one histogram sample."""
    metrics = getattr(app, "gradeflow_metrics", None)
    if metrics is not None and records:
        metrics.observe_batch(records[0].timestamp_ms)
