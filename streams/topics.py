"""The topics gradeflow uses: their declared layout, creation and checking.

Layout, from settings (all ``GRADEFLOW_*``):

* inputs (transactions, interactions): ``partitions``; delete, ``input_retention_ms``
  or the broker's default;
* grade changes: ``grade_changes_cleanup_policy`` (compact by default);
* alerts and dead letters: delete with ``alerts_retention_ms`` / ``dead_letters_retention_ms``;
* the rules-control topic (``<app id>-rules-control``): 1 partition, compact;
* the alert retry topic (``<app id>-alert-retries`` or ``topic_alert_retries``), when the
  worker runs the downstream agents: ``partitions``, delete after 14 days; with it the alert
  dead-letter topic (``topic_alert_dead_letters``), delete after ``alert_dead_letters_retention_ms``;
* each table's changelog (``<app id>-<table>-changelog``): compact, and exactly
  as many partitions as the inputs: Faust restores partition *n* of a table
  from partition *n* of its changelog, for the worker that owns partition *n*
  of the inputs (co-partitioning);
* every topic: ``replication_factor`` (unset: the cluster's ``default.replication.factor``,
  which the broker applies when asked for -1) and ``min.insync.replicas``.

``create_topics`` creates what is missing (idempotent, never alters an
existing topic); ``check_topics`` names every difference between the cluster
and this layout, and adds warnings (replication factor 1 on a cluster of
several brokers: :func:`replication_warnings`) that do not fail the check. The worker runs both at start (create only when
``create_topics`` is on) and refuses to run when the check finds a problem.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, NoBrokersAvailable, TopicAlreadyExistsError

from schemas.errors import ConfigurationError, ServerUnavailable
from streams.kafka_config import bootstrap_list, check_tls, kafka_python_options, tcp_answers, unreachable_message
from streams.settings import (Settings, alert_retries_topic, erasure_topics, merges_topic, rules_control_topic,
                              shadow_diffs_topic, shadow_ruleset_names)

__all__ = ["TABLES", "TopicSpec", "Problem", "topic_specs", "bootstrap_list", "unreachable_message",
           "admin_client", "create_topics", "check_topics", "replication_warnings", "new_topic",
           "cluster_default_replication_factor"]

# The Faust tables of streams/app.py; each has a changelog topic (a test keeps this in step with the app).
TABLES = ("customer-state",)

INPUT, OUTPUT, CHANGELOG, INTERNAL = "input", "output", "changelog", "internal"
CONTROL = "control"  # the rules-control topic: written by `gradeflow rules promote|rollback`, read by every worker

# How long an alert waiting for another delivery attempt stays on the retry topic: far longer
# than the retry schedule (capped at GRADEFLOW_ALERT_RETRY_MAX_DELAY_S between rounds), short
# enough that an alert nobody could deliver does not linger for ever. streams/downstream/wiring.py
# declares the topic with the same value.
ALERT_RETRIES_RETENTION_S = 14 * 24 * 3600


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str  # INPUT | OUTPUT | CHANGELOG | INTERNAL | CONTROL
    partitions: int
    replication_factor: int | None  # None: the cluster's default.replication.factor
    config: dict[str, str] = field(default_factory=dict)

    @property
    def cleanup_policy(self) -> str:
        return self.config.get("cleanup.policy", "delete")


@dataclass(frozen=True)
class Problem:
    """One difference between the cluster and the layout gradeflow needs."""

    topic: str
    kind: str  # missing | partitions | co-partitioning | replication | cleanup.policy | min.insync.replicas
    message: str

    def __str__(self) -> str:
        return self.message


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic gradeflow reads or writes, with its declared layout."""
    n, rf = settings.partitions, settings.replication_factor
    common = {"min.insync.replicas": str(settings.min_insync_replicas)}
    inputs = {**common, "cleanup.policy": "delete"}
    if settings.input_retention_ms is not None:
        inputs["retention.ms"] = str(settings.input_retention_ms)
    names = settings.topics
    specs = [
        TopicSpec(names.transactions, INPUT, n, rf, inputs),
        TopicSpec(names.interactions, INPUT, n, rf, dict(inputs)),
        TopicSpec(names.grade_changes, OUTPUT, n, rf,
                  {**common, "cleanup.policy": settings.grade_changes_cleanup_policy}),
        TopicSpec(names.alerts, OUTPUT, n, rf,
                  {**common, "cleanup.policy": "delete", "retention.ms": str(settings.alerts_retention_ms)}),
        TopicSpec(names.dead_letters, OUTPUT, n, rf,
                  {**common, "cleanup.policy": "delete", "retention.ms": str(settings.dead_letters_retention_ms)}),
    ]
    if shadow_ruleset_names(settings):
        # Each customer's active and shadow grades (rules/shadow.py): the latest per customer is the truth.
        specs.append(TopicSpec(shadow_diffs_topic(settings), OUTPUT, n, rf, {**common, "cleanup.policy": "compact"}))
    # The active ruleset and the re-grade progress of every worker (streams/rules_control.py): one
    # partition, so that every worker reads the records in one order; compacted, so that the latest
    # record of each key (the active ruleset, each worker's progress) is kept for ever.
    specs.append(TopicSpec(rules_control_topic(settings), CONTROL, 1, rf, {**common, "cleanup.policy": "compact"}))
    for table in TABLES:
        specs.append(TopicSpec(settings.changelog_topic(table), CHANGELOG, n, rf,
                               {**common, "cleanup.policy": "compact"}))
    if settings.downstream:
        # The alert dispatcher's retry topic (streams/downstream/wiring.py). Faust would declare it at
        # start, but only a principal allowed to create topics can; `topics create` provisions it
        # with the rest when the workers may not (GRADEFLOW_CREATE_TOPICS=false).
        specs.append(TopicSpec(alert_retries_topic(settings), INTERNAL, n, rf,
                               {**common, "cleanup.policy": "delete",
                                "retention.ms": str(ALERT_RETRIES_RETENTION_S * 1000)}))
        # Alerts a sink refused for good (streams/downstream/alerts/delivery.py): written by the dispatcher only.
        specs.append(TopicSpec(names.alert_dead_letters, OUTPUT, n, rf,
                               {**common, "cleanup.policy": "delete",
                                "retention.ms": str(settings.alert_dead_letters_retention_ms)}))
    if settings.erasure_key is not None:
        specs += erasure_specs(settings)
    if settings.customer_merges:
        specs += merge_specs(settings)
    return specs


def merge_specs(settings: Settings) -> list[TopicSpec]:
    """The merge topic (docs/customers.md), declared only when GRADEFLOW_CUSTOMER_MERGES is on.

    An input, co-partitioned with the others: a merge's steps go to the partition of the worker
    that holds the state they need, and a merged-away id's later events to the survivor's. It
    keeps records as long as the inputs do: they are that id's events.
    """
    config = {"min.insync.replicas": str(settings.min_insync_replicas), "cleanup.policy": "delete"}
    if settings.input_retention_ms is not None:
        config["retention.ms"] = str(settings.input_retention_ms)
    return [TopicSpec(merges_topic(settings), INPUT, settings.partitions, settings.replication_factor, config)]


def erasure_specs(settings: Settings) -> list[TopicSpec]:
    """The erasure topics (docs/erasure.md), declared only when GRADEFLOW_ERASURE_KEY is set.

    Requests are an input, co-partitioned with the others: an erasure visits each input
    partition on the worker that owns it. Markers are compacted (one per customer, no personal
    data) and outlive the inputs; requests and receipts name customers and expire.
    """
    n, rf = settings.partitions, settings.replication_factor
    common = {"min.insync.replicas": str(settings.min_insync_replicas)}
    names = erasure_topics(settings)
    markers = {**common, "cleanup.policy": "compact"}
    if settings.erasure_markers_retention_ms is not None:
        markers = {**common, "cleanup.policy": "compact,delete", "retention.ms": str(settings.erasure_markers_retention_ms)}
    return [
        TopicSpec(names.requests, INPUT, n, rf,
                  {**common, "cleanup.policy": "delete", "retention.ms": str(settings.erasure_requests_retention_ms)}),
        TopicSpec(names.markers, INTERNAL, 1, rf, markers),
        TopicSpec(names.receipts, OUTPUT, 1, rf,
                  {**common, "cleanup.policy": "delete", "retention.ms": str(settings.erasure_receipts_retention_ms)}),
    ]


class _ConnectionErrors(logging.Handler):
    """Collects what kafka-python logs about failed connections: it reports a SASL failure as
    a version or connection error, and says what really happened only in its log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def admin_client(settings: Settings, timeout_s: float = 10.0) -> KafkaAdminClient:
    """A connected admin client, or one line saying why not (no broker, TLS, authentication)."""
    check_tls(settings, timeout_s=timeout_s)
    options = kafka_python_options(settings)
    seen = _ConnectionErrors()
    conn_log = logging.getLogger("kafka.conn")
    conn_log.addHandler(seen)
    try:
        return KafkaAdminClient(
            **options,
            client_id=f"{settings.kafka_client_id}-admin",
            request_timeout_ms=int(timeout_s * 1000),
            api_version_auto_timeout_ms=int(timeout_s * 1000),
        )
    except (KafkaError, ValueError, OSError) as exc:
        line = _kafka_error_line(settings, exc, seen.messages)
        if line is None and tcp_answers(settings):
            line = (f"a server listens at {settings.kafka_bootstrap} but the Kafka handshake failed with "
                    f"GRADEFLOW_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}; check the protocol "
                    f"and the listener (TLS? SASL?)")
        if line is None:
            raise ServerUnavailable(unreachable_message(settings)) from None
        raise ConfigurationError(line) from None
    finally:
        conn_log.removeHandler(seen)


def _kafka_error_line(settings: Settings, exc: BaseException, logged: list[str]) -> str | None:
    """One secret-free line for a failed connection; None when no broker answered at all."""
    text = " ".join([type(exc).__name__, *logged])
    if "SaslAuthenticationFailed" in text or "Authentication failed" in text:
        return (f"Kafka at {settings.kafka_bootstrap} rejected the credentials of user "
                f"{settings.kafka_sasl_username!r} ({settings.kafka_sasl_mechanism}); check "
                f"GRADEFLOW_KAFKA_SASL_USERNAME and the password (GRADEFLOW_KAFKA_SASL_PASSWORD[_FILE])")
    if "UnsupportedSaslMechanism" in text or "IllegalSaslState" in text:
        return (f"Kafka at {settings.kafka_bootstrap} does not accept SASL mechanism {settings.kafka_sasl_mechanism} "
                f"on this listener; check GRADEFLOW_KAFKA_SASL_MECHANISM and GRADEFLOW_KAFKA_SECURITY_PROTOCOL")
    if "Authorization" in text:
        return f"Kafka at {settings.kafka_bootstrap} denied this client ({type(exc).__name__}); check its ACLs"
    if isinstance(exc, NoBrokersAvailable) or not isinstance(exc, KafkaError) or not logged:
        return None
    return (f"Kafka at {settings.kafka_bootstrap} does not speak {settings.kafka_security_protocol} as configured "
            f"({type(exc).__name__}); check GRADEFLOW_KAFKA_SECURITY_PROTOCOL")


def new_topic(spec: TopicSpec) -> NewTopic:
    """The admin request for ``spec``: replication factor -1 when unset, so the broker applies its
    ``default.replication.factor`` (CreateTopics v4+, Kafka 2.4+)."""
    rf = spec.replication_factor if spec.replication_factor is not None else -1
    return NewTopic(spec.name, spec.partitions, rf, topic_configs=spec.config)


def replication_warnings(brokers: int, replication: Mapping[str, int]) -> list[str]:
    """Warnings about topic ``name → replication factor`` on a cluster of ``brokers`` brokers.

    A topic with one replica on a cluster that could hold more loses its
    partitions (inputs, grades, the table's changelog) with a single broker's disk.
    """
    if brokers < 2:
        return []
    return [f"warning: {name}: replication factor 1 on a cluster of {brokers} brokers: one broker's loss "
            f"loses its data (set GRADEFLOW_REPLICATION_FACTOR, e.g. 3, or the brokers' "
            f"default.replication.factor, and reassign the topic's partitions)"
            for name, rf in sorted(replication.items()) if rf == 1]


def cluster_default_replication_factor(admin: KafkaAdminClient) -> int:
    """The ``default.replication.factor`` of the cluster (one broker's; brokers of a cluster share it)."""
    brokers = admin.describe_cluster()["brokers"]
    resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]))
    for response in admin.describe_configs([resource]):
        for error_code, _msg, _rtype, _rname, entries in response.resources:
            if error_code == 0:
                for entry in entries:
                    if entry[0] == "default.replication.factor" and entry[1] is not None:
                        return int(entry[1])
    return 1  # Kafka's own default


def _describe(admin: KafkaAdminClient, names: list[str]) -> dict[str, tuple[int, int, dict[str, str]]]:
    """name → (partitions, smallest replication factor, topic configs) for existing topics among ``names``."""
    existing = set(admin.list_topics())
    present = [n for n in names if n in existing]
    if not present:
        return {}
    shape = {}
    for t in admin.describe_topics(present):
        parts = t["partitions"]
        shape[t["topic"]] = (len(parts), min((len(p["replicas"]) for p in parts), default=0))
    configs: dict[str, dict[str, str]] = {n: {} for n in present}
    for response in admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in present]):
        for error_code, _msg, _rtype, rname, entries in response.resources:
            if error_code == 0:
                configs[rname] = {e[0]: e[1] for e in entries}
    return {n: (*shape[n], configs[n]) for n in present if n in shape}


def create_topics(settings: Settings, admin: KafkaAdminClient | None = None) -> list[str]:
    """Create every missing topic with its declared layout; return the names created (idempotent).

    Existing topics are never altered: ``check_topics`` reports what differs.
    """
    own = admin is None
    admin = admin or admin_client(settings)
    try:
        existing = set(admin.list_topics())
        created = []
        for spec in topic_specs(settings):
            if spec.name in existing:
                continue
            try:
                admin.create_topics([new_topic(spec)])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                rf = spec.replication_factor or "the cluster's default"
                raise ConfigurationError(f"cannot create topic {spec.name} ({spec.partitions} partitions, "
                                         f"replication factor {rf}): {type(exc).__name__}"
                                         f"{': ' + str(exc.args[0]) if exc.args else ''}") from None
        _wait_visible(admin, created)
        return created
    finally:
        if own:
            admin.close()


def _wait_visible(admin: KafkaAdminClient, names: list[str], timeout_s: float = 15.0) -> None:
    """Wait until created topics show in the metadata brokers serve (KRaft propagates it asynchronously)."""
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for t in admin.describe_topics(sorted(pending)):
            if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"]):
                pending.discard(t["topic"])
        if pending:
            time.sleep(0.1)


def check_topics(settings: Settings, admin: KafkaAdminClient | None = None, settle_s: float = 3.0,
                 warnings: list[str] | None = None) -> list[Problem]:
    """Every difference between the cluster's topics and the layout gradeflow needs; [] when fine.

    A topic seen missing is looked up again for up to ``settle_s``: each broker learns of a new
    topic on its own time, so right after ``topics create`` another broker may not know it yet.
    Warnings (:func:`replication_warnings`) are appended to ``warnings`` when given.
    """
    own = admin is None
    admin = admin or admin_client(settings)
    try:
        specs = topic_specs(settings)
        names = [s.name for s in specs]
        found = _describe(admin, names)
        deadline = time.monotonic() + settle_s
        while len(found) < len(names) and time.monotonic() < deadline:
            time.sleep(0.25)
            found = _describe(admin, names)
        if warnings is not None:
            brokers = len(admin.describe_cluster()["brokers"])
            warnings.extend(replication_warnings(brokers, {name: shape[1] for name, shape in found.items()}))
    finally:
        if own:
            admin.close()
    problems: list[Problem] = []
    inputs = [s for s in specs if s.role == INPUT and s.name in found]
    for spec in specs:
        if spec.name not in found:
            problems.append(Problem(spec.name, "missing", f"{spec.name}: missing ({spec.role} topic; "
                                    f"create it with `gradeflow topics create`)"))
            continue
        partitions, rf, config = found[spec.name]
        if spec.role == INPUT and partitions != spec.partitions:
            problems.append(Problem(spec.name, "partitions",
                                    f"{spec.name}: {partitions} partitions, but GRADEFLOW_PARTITIONS is "
                                    f"{spec.partitions} (the tables are partitioned like the inputs)"))
        if spec.role == CHANGELOG:
            for inp in inputs:  # one line per changelog, naming the first input that differs
                if found[inp.name][0] != partitions:
                    problems.append(Problem(spec.name, "co-partitioning",
                                            f"{spec.name}: {partitions} partitions, but its input {inp.name} has "
                                            f"{found[inp.name][0]}: co-partitioning broken (state would be restored "
                                            f"on the wrong worker)"))
                    break
        if spec.replication_factor is not None and rf < spec.replication_factor:
            problems.append(Problem(spec.name, "replication",
                                    f"{spec.name}: replication factor {rf}, below GRADEFLOW_REPLICATION_FACTOR "
                                    f"{spec.replication_factor}"))
        policy = config.get("cleanup.policy")
        if policy is not None and _policy(policy) != _policy(spec.cleanup_policy):
            problems.append(Problem(spec.name, "cleanup.policy",
                                    f"{spec.name}: cleanup.policy is {policy}, gradeflow needs {spec.cleanup_policy}"))
        if spec.replication_factor is None and 0 < rf < settings.min_insync_replicas:
            problems.append(Problem(spec.name, "replication",
                                    f"{spec.name}: replication factor {rf}, below GRADEFLOW_MIN_INSYNC_REPLICAS "
                                    f"{settings.min_insync_replicas}: no write with acks=all can succeed"))
        isr = config.get("min.insync.replicas")
        if isr is not None and isr.isdigit() and int(isr) < settings.min_insync_replicas:
            problems.append(Problem(spec.name, "min.insync.replicas",
                                    f"{spec.name}: min.insync.replicas {isr}, below GRADEFLOW_MIN_INSYNC_REPLICAS "
                                    f"{settings.min_insync_replicas}"))
    return problems


def _policy(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())
