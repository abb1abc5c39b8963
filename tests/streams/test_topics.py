"""`gradeflow topics create|check` and the worker's start-up check, on the real local broker."""

from __future__ import annotations

import os
import subprocess
import sys

from kafka.admin import NewTopic

from streams.tools.local import ROOT, drop_run, unique_env
from streams.settings import alert_retries_topic, load_settings
from streams.topics import (ALERT_RETRIES_RETENTION_S, INTERNAL, TABLES, admin_client, check_topics, create_topics,
                            topic_specs)


def cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def settings_of(env: dict[str, str], **more: object):
    overrides = {k[len("GRADEFLOW_"):].lower(): v for k, v in env.items() if k.startswith("GRADEFLOW_")}
    return load_settings(**{**overrides, **more})


def test_the_tables_listed_are_the_apps_tables():
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.app import create_app

    s = load_settings(app_id="layout-probe")
    app = create_app(s, compile_ruleset(load("rfm-5")))
    assert sorted(app.tables.keys()) == sorted(TABLES)
    assert sorted(t.changelog_topic.get_topic_name() for t in app.tables.values()) == \
        sorted(s.changelog_topic(t) for t in TABLES)


def test_the_layout_has_the_alert_retry_topic_and_every_name_carries_the_prefix():
    s = load_settings(topic_prefix="team-risk.", app_id="gf")
    specs = {spec.name: spec for spec in topic_specs(s)}
    assert all(name.startswith("team-risk.") for name in specs), sorted(specs)
    retries = specs["team-risk.gf-alert-retries"]
    assert retries.role == INTERNAL and retries.partitions == s.partitions
    assert retries.cleanup_policy == "delete" and retries.config["retention.ms"] == str(14 * 24 * 3600 * 1000)

    # A name of its own keeps the prefix, like every other topic name.
    named = load_settings(topic_prefix="team-risk.", topic_alert_retries="alert-redelivery")
    assert "team-risk.alert-redelivery" in {spec.name for spec in topic_specs(named)}
    # Without the downstream agents no worker reads or writes it, so it is not required.
    assert not [spec for spec in topic_specs(load_settings(downstream=False)) if spec.role == INTERNAL]


def test_the_alert_retry_topic_of_the_layout_is_the_one_the_app_declares():
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.app import create_app

    s = load_settings(app_id="layout-probe", topic_prefix="team-risk.")
    app = create_app(s, compile_ruleset(load("rfm-5")))
    declared = app.gradeflow_downstream.retry_topic
    [spec] = [spec for spec in topic_specs(s) if spec.role == INTERNAL]
    assert declared.get_topic_name() == spec.name == alert_retries_topic(s) == "team-risk.layout-probe-alert-retries"
    assert declared.partitions == spec.partitions and declared.replicas == spec.replication_factor
    assert declared.retention == ALERT_RETRIES_RETENTION_S  # seconds, as Faust takes it


def test_the_population_topic_carries_the_prefix():
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.population import Population

    ruleset = compile_ruleset(load("key-account-abc"))
    assert ruleset.quantiles, "the preset must grade against the population"
    assert Population(load_settings(topic_prefix="team-risk.", app_id="gf"), ruleset, store=None).topic == \
        "team-risk.gf-population"
    assert Population(load_settings(), ruleset, store=None).topic == "gradeflow-population"


def test_create_is_idempotent_and_check_passes(bootstrap):
    env = unique_env("topics", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap)
    first = cli(env, "topics", "create")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created: ") and first.stdout.count(",") == len(topic_specs(settings_of(env))) - 1
    again = cli(env, "topics", "create")
    assert again.returncode == 0 and again.stdout.strip() == "all topics already exist"
    check = cli(env, "topics", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith(f"ok: {len(topic_specs(settings_of(env)))} topics match")
    assert env["GRADEFLOW_APP_ID"] + "-alert-retries" in first.stdout

    # The declared configs are on the cluster.
    from kafka.admin import ConfigResource, ConfigResourceType

    s = settings_of(env)
    admin = admin_client(s)
    try:
        [resp] = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.topics.grade_changes),
                                         ConfigResource(ConfigResourceType.TOPIC, s.topics.alerts),
                                         ConfigResource(ConfigResourceType.TOPIC, alert_retries_topic(s))])
        got = {r[3]: {e[0]: e[1] for e in r[4]} for r in resp.resources}
    finally:
        admin.close()
    assert got[s.topics.grade_changes]["cleanup.policy"] == "compact"
    assert got[s.topics.alerts]["cleanup.policy"] == "delete"
    assert got[s.topics.alerts]["retention.ms"] == str(28 * 24 * 3600 * 1000)
    assert got[s.topics.alerts]["min.insync.replicas"] == "1"
    assert got[alert_retries_topic(s)]["cleanup.policy"] == "delete"
    assert got[alert_retries_topic(s)]["retention.ms"] == str(ALERT_RETRIES_RETENTION_S * 1000)


def test_check_names_each_difference_of_a_broken_layout_and_the_worker_refuses_it(bootstrap):
    env = unique_env("broken", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap)
    s = settings_of(env)
    names = s.topics
    changelog = s.changelog_topic("customer-state")
    admin = admin_client(s)
    try:
        # Deliberately broken: interactions missing, a changelog with 3 partitions for inputs with 4,
        # grade-changes with the wrong cleanup policy; the rest as gradeflow would make them.
        admin.create_topics([NewTopic(changelog, 3, 1, topic_configs={"cleanup.policy": "compact"}),
                             NewTopic(names.grade_changes, 4, 1, topic_configs={"cleanup.policy": "delete"})])
        for spec in topic_specs(s):
            if spec.name not in (names.interactions, changelog, names.grade_changes):
                admin.create_topics([NewTopic(spec.name, spec.partitions, 1, topic_configs=spec.config)])
        from streams.topics import _wait_visible

        _wait_visible(admin, [spec.name for spec in topic_specs(s) if spec.name != names.interactions])
    finally:
        admin.close()

    kinds = sorted((p.topic, p.kind) for p in check_topics(s))
    assert kinds == sorted([(names.interactions, "missing"), (changelog, "co-partitioning"),
                            (names.grade_changes, "cleanup.policy")])

    out = cli(env, "topics", "check")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert f"{names.interactions}: missing (input topic; create it with `gradeflow topics create`)" in lines
    assert any(line.startswith(f"{changelog}: 3 partitions, but its input {names.transactions} has 4: "
                               "co-partitioning broken") for line in lines)
    assert f"{names.grade_changes}: cleanup.policy is delete, gradeflow needs compact" in lines
    assert len(lines) == 3, out.stdout

    # Asking for more durability than the topics have names replication and min.insync.replicas.
    strict = cli({**env, "GRADEFLOW_REPLICATION_FACTOR": "2", "GRADEFLOW_MIN_INSYNC_REPLICAS": "2"},
                 "topics", "check")
    assert strict.returncode == 1
    assert f"{names.transactions}: replication factor 1, below GRADEFLOW_REPLICATION_FACTOR 2" in strict.stdout
    assert f"{names.alerts}: min.insync.replicas 1, below GRADEFLOW_MIN_INSYNC_REPLICAS 2" in strict.stdout

    # The worker creates the missing topic but refuses the rest, and says why; nothing is consumed.
    worker = cli({**env, "GRADEFLOW_WEB_PORT": "0"}, "worker")
    assert worker.returncode == 1
    assert "co-partitioning broken" in worker.stderr and "cleanup.policy is delete" in worker.stderr
    assert "refusing to start on this topic layout (2 problem(s)" in worker.stderr
    assert "Ready" not in worker.stdout + worker.stderr
    assert sorted(p.kind for p in check_topics(s)) == ["cleanup.policy", "co-partitioning"]

    # Without create_topics the worker creates nothing.
    env2 = unique_env("nocreate", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_CREATE_TOPICS="false")
    refused = cli(env2, "worker")
    assert refused.returncode == 1 and "refusing to start" in refused.stderr
    assert len(check_topics(settings_of(env2))) == len(topic_specs(settings_of(env2)))


def test_create_topics_returns_only_what_it_created(bootstrap):
    env = unique_env("partial", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap)
    s = settings_of(env)
    admin = admin_client(s)
    try:
        admin.create_topics([NewTopic(s.topics.transactions, 4, 1)])
    finally:
        admin.close()
    created = create_topics(s)
    assert s.topics.transactions not in created and len(created) == len(topic_specs(s)) - 1
    assert create_topics(s) == []


def test_the_replication_factor_is_the_clusters_default_unless_set(monkeypatch):
    monkeypatch.delenv("GRADEFLOW_REPLICATION_FACTOR", raising=False)
    from streams.topics import new_topic

    unset = load_settings()
    assert unset.replication_factor is None
    assert {new_topic(spec).replication_factor for spec in topic_specs(unset)} == {-1}  # the broker's default
    assert {new_topic(spec).replication_factor for spec in topic_specs(load_settings(replication_factor=3,
                                                                                   min_insync_replicas=2))} == {3}


def test_replication_factor_1_on_several_brokers_is_warned_about():
    from streams.topics import replication_warnings

    assert replication_warnings(1, {"a": 1, "b": 1}) == []  # one broker: nothing better is possible
    assert replication_warnings(3, {"a": 3, "b": 2}) == []
    warned = replication_warnings(3, {"b": 1, "a": 3, "c": 1})
    assert [w.split(":")[1].strip() for w in warned] == ["b", "c"]
    assert all("replication factor 1 on a cluster of 3 brokers" in w for w in warned)


def test_create_uses_the_clusters_default_replication_factor(bootstrap, monkeypatch):
    monkeypatch.delenv("GRADEFLOW_REPLICATION_FACTOR", raising=False)
    from streams.topics import _describe, cluster_default_replication_factor

    env = unique_env("defaultrf", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap)
    s = settings_of(env)
    assert s.replication_factor is None
    try:
        created = create_topics(s)
        assert len(created) == len(topic_specs(s))
        admin = admin_client(s)
        try:
            expected = cluster_default_replication_factor(admin)
            shapes = _describe(admin, created)
        finally:
            admin.close()
        assert {name: shape[1] for name, shape in shapes.items()} == {name: expected for name in created}
        warnings: list[str] = []
        assert check_topics(s, warnings=warnings) == []
        assert warnings == []  # the local cluster has one broker
        check = cli(env, "topics", "check")
        assert check.returncode == 0 and "replication factor the cluster's default" in check.stdout, check.stdout
    finally:
        drop_run(bootstrap, env)
