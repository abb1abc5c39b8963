"""The deployment files, offline: no Secret shipped (each one referenced is created as docs/deploy.md
says), the HTTP port reachable only where it must be and guarded there, and the monitoring manifests
naming only metrics the worker exports."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import yaml

from streams.tools.local import ROOT
from tests.deploy.test_packaging import COMPOSE, DOCS, K8S, OPERATOR_API, manifests

API_VERSIONS = {
    "ConfigMap": "v1", "Service": "v1", "StatefulSet": "apps/v1", "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1", "ServiceMonitor": OPERATOR_API, "PrometheusRule": OPERATOR_API,
}


def secrets_created_in_docs() -> dict[str, set[str]]:
    """Secret name → keys, from the ``kubectl create secret generic`` commands in docs/deploy.md
    (continuation lines and the commented optional keys that follow a command included)."""
    created: dict[str, set[str]] = {}
    current: str | None = None
    for line in DOCS.read_text().splitlines():
        found = re.search(r"kubectl create secret generic ([a-z0-9-]+)", line)
        if found:
            current = found.group(1)
            created.setdefault(current, set())
        elif current is not None and not line.strip().startswith(("--from-", "#")):
            current = None
        if current is not None:
            created[current].update(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9._-]+)=", line))
    return created


def secret_references(docs: list[dict]) -> dict[str, set[str]]:
    """Secret name → keys that the manifests read (env, envFrom, volumes, the ServiceMonitor's token)."""
    refs: dict[str, set[str]] = {}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gradeflow-config")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef") or node.get("bearerTokenSecret")
            if ref:
                refs.setdefault(ref["name"], set()).add(ref["key"])
            if "secretRef" in node:
                refs.setdefault(node["secretRef"]["name"], set())
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                # A mounted Secret: the keys are the files the settings point into its mount.
                refs.setdefault(node["secret"]["secretName"], set())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for doc in docs:
        walk(doc)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret")  # volumeClaimTemplates are not volumes
            if secret:
                for value in config["data"].values():
                    if value.startswith(mount["mountPath"] + "/"):
                        refs[secret["secretName"]].add(value[len(mount["mountPath"]) + 1:])
    return refs


def test_every_manifest_parses_with_its_kinds_api_version():
    docs = manifests()
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (doc["kind"], doc["apiVersion"])
        assert doc["metadata"]["name"]
    assert {d["kind"] for d in docs} == set(API_VERSIONS)


def test_no_secret_is_shipped_and_each_one_referenced_is_created_in_the_docs():
    docs = manifests()
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret in deploy/k8s/ overwrites the real one"
    for path in K8S.rglob("*.yaml"):
        assert "REPLACE" not in path.read_text(), f"{path} holds a placeholder"
    refs = secret_references(docs)
    assert set(refs) == {"gradeflow-kafka", "gradeflow-secrets"}, refs
    created = secrets_created_in_docs()
    for name, keys in refs.items():
        assert name in created, f"docs/deploy.md has no `kubectl create secret generic {name}`"
        assert keys <= created[name], f"{name}: keys {sorted(keys - created[name])} are not in its create line"
    # The credentials the worker reads from gradeflow-secrets are GRADEFLOW_ settings, all of them secret types.
    from pydantic import SecretStr

    from streams.settings import load_settings

    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    [worker] = sts["spec"]["template"]["spec"]["containers"]
    from_secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in worker["env"] if "valueFrom" in e
                    and "secretKeyRef" in e["valueFrom"]}
    settings = load_settings(**{name.removeprefix("GRADEFLOW_").lower(): "redis://:x@redis:6379/0" if "REDIS" in name
                                else "value" for name in from_secrets})
    for name in from_secrets:
        assert isinstance(getattr(settings, name.removeprefix("GRADEFLOW_").lower()), SecretStr), name
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gradeflow-config")
    assert not set(from_secrets) & set(config["data"]), "a secret setting in the ConfigMap"


def test_the_http_port_is_open_only_where_it_must_be_and_guarded_there():
    docs = manifests()
    # The image binds 127.0.0.1 (the settings' default); its health check runs inside the container.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "GRADEFLOW_WEB_HOST" not in re.sub(r"^#.*$", "", dockerfile, flags=re.M)
    from streams.settings import Settings

    assert Settings.model_fields["web_host"].default == "127.0.0.1"
    # Kubernetes binds every address (probes, Prometheus) behind a NetworkPolicy on the workers' pods.
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gradeflow-config")
    assert config["data"]["GRADEFLOW_WEB_HOST"] == "0.0.0.0"
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [worker] = sts["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in worker["ports"]}
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "an ingress rule without sources admits everyone"
        assert {p["port"] for p in rule["ports"]} <= port_names
    # Compose publishes every port on the host's loopback only.
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def exported_metrics() -> set[str]:
    """The names of the samples a worker's /metrics serves, from streams/downstream/metrics.py itself."""
    from streams.app import Counters
    from streams.downstream.metrics import Metrics

    app = SimpleNamespace(gradeflow_counters=Counters())
    text = Metrics(app).render().decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "counter":
            base = name.removesuffix("_total")  # prometheus-client writes the TYPE line with or without it
            names |= {base + "_total", base + "_created"}
        elif kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
        else:
            names.add(name)
    return names


def test_the_monitoring_manifests_name_only_exported_metrics_and_scrape_with_the_token():
    docs = manifests()
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    exported = exported_metrics()
    alerts = []
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            used = set(re.findall(r"\b(gradeflow_\w+)", r["expr"]))
            assert used, r["alert"]
            assert used <= exported, (r["alert"], sorted(used - exported))
            assert r["labels"]["severity"] in ("info", "warning", "critical") and r["annotations"]["summary"]
            alerts.append(r["alert"])
    # The four conditions operators must hear about: lag, dead letters, a stalled worker, failing sinks.
    expressions = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    for metric in ("gradeflow_consumer_lag", "gradeflow_events_dead_lettered_total", "gradeflow_batches_total",
                   "gradeflow_alerts_failed_total", "gradeflow_redis_up"):
        assert metric in expressions and metric in exported, metric
    assert len(alerts) == len(set(alerts))
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    [worker] = sts["spec"]["template"]["spec"]["containers"]
    token = next(e for e in worker["env"] if e["name"] == "GRADEFLOW_API_TOKEN")["valueFrom"]["secretKeyRef"]
    assert endpoint["bearerTokenSecret"] == {"name": token["name"], "key": token["key"]}
