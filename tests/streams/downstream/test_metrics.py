"""Metrics without a broker: the agent's counters are exposed, and the Grafana dashboard charts only real metrics."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from streams.app import Counters
from streams.tools.local import ROOT
from streams.downstream.metrics import Metrics, observe_batch


def metrics_text() -> str:
    counters = Counters(consumed=7, applied=3, duplicates=2, replayed=1, dead_lettered=1, grade_changes=2, alerts=1,
                        by_topic={"transactions": 4, "interactions": 1})
    app = SimpleNamespace(gradeflow_counters=counters)
    m = Metrics(app)
    app.gradeflow_metrics = m
    observe_batch(app, [SimpleNamespace(timestamp_ms=1)])
    m.changes.labels("value", "downgrade").inc()
    m.redis_writes.labels("applied").inc()
    m.set_grade_counts({"value": {"S": 1, "B": 2}})
    m.alert_event("sent", sink="pagerduty", kind="trigger")
    m.alert_event("failed", sink="slack")
    m.alert_event("held_back", sink="slack")
    return m.render().decode()


def test_counters_of_the_grading_agent_are_exposed():
    text = metrics_text()
    assert 'gradeflow_events_consumed_total{topic="transactions"} 4.0' in text
    assert "gradeflow_events_dead_lettered_total 1.0" in text
    assert "gradeflow_events_replayed_total 1.0" in text
    assert "gradeflow_events_duplicate_total 2.0" in text
    assert "gradeflow_events_unreconciled 0.0" in text  # 7 = 3 applied + 2 duplicates + 1 replayed + 1 dead lettered
    assert "gradeflow_processing_latency_seconds_count 1.0" in text
    assert 'gradeflow_customers_by_grade{grade="B",ladder="value"} 2.0' in text
    assert 'gradeflow_alerts_sent_total{kind="trigger",sink="pagerduty"} 1.0' in text
    assert 'gradeflow_alerts_failed_total{sink="slack"} 1.0' in text
    assert 'gradeflow_grade_changes_total{direction="downgrade",ladder="value"} 1.0' in text


def test_unreconciled_counts_records_in_none_of_the_four_outcomes():
    from streams.downstream.metrics import unreconciled

    assert unreconciled(Counters(consumed=10, applied=5, duplicates=2, replayed=2, dead_lettered=1)) == 0
    assert unreconciled(Counters(consumed=10, applied=5, duplicates=2, replayed=1, dead_lettered=1)) == 1


def test_the_dashboard_charts_only_exported_metrics():
    text = metrics_text()
    exported = set(re.findall(r"^(gradeflow_\w+?)(?:\{| )", text, re.M))
    exported |= {"gradeflow_consumer_lag"}  # only present once a consumer has partitions
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "gradeflow.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\b(gradeflow_\w+)", target["expr"]))
    assert used, "no queries in the dashboard"
    assert used <= exported, sorted(used - exported)
