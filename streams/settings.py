"""All configuration, from ``GRADEFLOW_*`` environment variables, read here only.

Defaults work on a laptop with ``deploy/local/up``. Every variable is listed
in the README's configuration table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
DAY_MS = 24 * 3600 * 1000


# Query parameters that carry a credential in a URL (redis-py reads ``?password=``).
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "token", "key", "secret"})


class SecretUrl(SecretStr):
    """A URL that may carry a credential: shown with it masked, ``redis://:***@host:6379/0``.

    Unlike :class:`~pydantic.SecretStr`, whose display hides everything, the
    host, port and path stay visible (they are what an operator needs to read
    in a start line or an error); the password of the user-info part and any
    credential in the query are replaced by ``***``. The real URL comes only
    from :meth:`get_secret_value`, where a client is built.
    """

    def __init__(self, secret_value: str) -> None:
        parts = urlsplit(secret_value)
        if not parts.scheme or not (parts.netloc or parts.path):
            # The message must not repeat the value: it may hold the credential.
            raise ValueError("not a URL (scheme://host...)")
        super().__init__(secret_value)

    def _display(self) -> str:
        return masked_url(self.get_secret_value())


def masked_url(url: str) -> str:
    """``url`` with the password of its user-info part and its query credentials replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class TopicNames:
    """The full names of gradeflow's topics on the cluster (``topic_prefix`` applied)."""

    transactions: str
    interactions: str
    grade_changes: str
    alerts: str
    dead_letters: str
    alert_dead_letters: str


class Settings(BaseSettings):
    """gradeflow settings; each field is ``GRADEFLOW_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="GRADEFLOW_", extra="ignore")

    kafka_bootstrap: str = Field("localhost:9092", description="Kafka bootstrap servers, comma-separated host:port.")
    redis_url: SecretUrl = Field(
        SecretUrl("redis://localhost:6379/0"),
        description="Redis server URL, redis://[:password@]host:port/db (rediss:// for TLS); shown with the "
                    "password masked.")
    app_id: str = Field("gradeflow", description="Consumer group and prefix of the tables' changelog topics.")
    ruleset: str = Field("rfm-5", description="Preset name or path of a ruleset YAML file.")
    topic_transactions: str = "transactions"
    topic_interactions: str = "interactions"
    topic_grade_changes: str = "grade-changes"
    topic_alerts: str = "grade-alerts"
    topic_dead_letters: str = "gradeflow-dead-letters"
    topic_alert_dead_letters: str = Field(
        "alert-dead-letters", description="Alerts a sink refused for good (HTTP 400, 410, ...): never retried, kept "
                                          "here with the sink, status and answer (docs/downstream.md, On-call).")
    partitions: int = Field(4, ge=1, description="Partitions of every topic gradeflow creates (inputs and changelogs must agree).")
    replication_factor: int | None = Field(
        None, ge=1, description="Replication factor of the topics gradeflow creates; default: the cluster's "
                                "default.replication.factor.")
    data_dir: Path = Field(Path(".local/worker"), description="Worker state directory (table offsets, RocksDB).")
    store: str = Field("memory://", description="Faust table store: memory:// or rocksdb://.")
    standby_replicas: int = Field(0, ge=0, description="Warm copies of each table partition kept by other workers (Faust table_standby_replicas), for faster failover; needs rocksdb://.")
    web_port: int = Field(6066, description="Port of the worker's HTTP server (bound to web_host).")
    web_host: str = Field("127.0.0.1", description="Address the worker's HTTP server binds to.")
    batch_size: int = Field(2000, ge=1, description="Most records the agent takes per batch.")
    batch_within: float = Field(0.05, gt=0, description="Seconds the agent waits to fill a batch.")
    report_interval: float = Field(10.0, gt=0, description="Seconds between the worker's gradeflow-stats log lines.")
    stop_timeout_s: float = Field(
        15.0, ge=1, le=3600, description="Seconds a worker has to stop cleanly after SIGTERM or SIGINT; then it exits at "
                                         "once (code 75), leaving what it had not acknowledged to be read again.")
    log_level: str = "info"
    malloc_arena_max: int = Field(
        2, ge=0, description="glibc malloc arenas of the worker process (MALLOC_ARENA_MAX); fewer arenas, less memory "
                             "held by the consumer thread's frees (streams/memory.py); 0: glibc's default.")
    malloc_mmap_threshold: int = Field(
        65_536, ge=0, description="Bytes from which glibc malloc gives an allocation a mapping of its own, returned when "
                                  "freed, fixed (MALLOC_MMAP_THRESHOLD_); fetch and produce buffers then leave no "
                                  "holes in the heap (streams/memory.py); 0: glibc's sliding default.")
    gc_threshold: int = Field(
        20_000, ge=0, description="Net container allocations between two young passes of Python's cycle collector "
                                  "in the worker (CPython's default 700 spent 7% of its CPU there; streams/memory.py); "
                                  "0: Python's default.")
    population_interval_s: float = Field(30.0, gt=0, description="Seconds between publications of the population sketches (relative grades).")
    # Late and future events (schemas/README.md, docs/guarantees.md).
    allowed_lateness_days: float | None = Field(
        None, gt=0, description="An event older than this many days before its customer's latest event goes to the "
                                "dead-letter topic (reason late); default: the ruleset's retention (longest window).")
    max_future_skew_s: float = Field(
        86400.0, gt=0, description="An event whose occurred_at is more than this many seconds after the worker's wall "
                                   "clock goes to the dead-letter topic (reason future_timestamp).")

    # Downstream: Redis current grades, alerts to on-call, HTTP API, metrics.
    # See docs/downstream.md.
    redis_prefix: str | None = Field(None, description="Prefix of every Redis key gradeflow writes; default: the app id with the topic prefix (so 'gradeflow').")
    downstream: bool = Field(True, description="Run the redis-writer and alert-dispatcher agents and the HTTP API in the worker.")
    redis_batch_size: int = Field(500, ge=1, description="Most grade changes the redis-writer applies per Redis round trip.")
    api_token: SecretStr | None = Field(None, description="Bearer token the HTTP API requires (all but /healthz and /readyz); unset: no token.")
    topic_alert_retries: str | None = Field(
        None, description="Topic of alert deliveries retried later; default '<app id>-alert-retries' (the app's own, "
                          "like its changelogs), topic prefix applied.")
    # A webhook URL is itself the credential (Slack's path, a token in a query): secret as a whole.
    alert_webhook_url: SecretStr | None = Field(None, description="Generic JSON webhook: receives every alert as a JSON POST (the grade-alerts document); secret.")
    alert_slack_webhook_url: SecretStr | None = Field(None, description="Slack incoming-webhook URL (secret).")
    alert_pagerduty_routing_key: SecretStr | None = Field(None, description="PagerDuty Events API v2 integration (routing) key (secret).")
    alert_pagerduty_url: str = Field("https://events.pagerduty.com/v2/enqueue", description="PagerDuty Events API v2 endpoint.")
    alert_alertmanager_url: SecretUrl | None = Field(
        None, description="Alertmanager base URL(s), comma-separated for an HA set (each gets every alert), e.g. "
                          "http://alertmanager:9093 (POST /api/v2/alerts); a password in one "
                          "(http://user:password@...) is shown masked.")
    alert_routes: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "critical": ["webhook", "slack", "pagerduty", "alertmanager"],
            "warning": ["webhook", "slack", "alertmanager"],
            "info": ["webhook", "alertmanager"],
        },
        description="Sinks per severity (JSON); a sink without its URL/key configured is skipped.")
    alert_severity: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description="Per ladder (JSON): {ladder: {critical_min_drop, critical_at_or_below, warning_min_drop}}; see docs/downstream.md.")
    alert_attempts: int = Field(3, ge=1, description="Delivery attempts in line (with backoff) before an alert goes to the retry topic.")
    alert_backoff_s: float = Field(0.5, gt=0, description="First in-line retry delay; doubles per attempt.")
    alert_retry_delay_s: float = Field(30.0, gt=0, description="First delay on the retry topic; doubles per round, capped by alert_retry_max_delay_s.")
    alert_retry_max_delay_s: float = Field(900.0, gt=0, description="Longest delay between rounds on the retry topic.")
    alert_timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one delivery attempt.")
    alert_cooldown_s: float = Field(3600.0, ge=0, description="At most one page per customer, ladder and sink in this time; later drops wait for its end.")
    alert_dedup_ttl_s: float = Field(30 * 86400.0, gt=0, description="How long delivered alert ids are remembered in Redis.")
    alert_alertmanager_resend_s: float = Field(60.0, gt=0, description="Firing alerts are re-sent to Alertmanager this often (endsAt 4 intervals ahead), until resolved.")
    alert_alertmanager_max_firing: int = Field(10_000, ge=1, description="Most alerts kept firing (re-sent) in Alertmanager; past it a new one is sent once and ends by itself.")
    alert_link_base_url: str | None = Field(None, description="Base URL of gradeflow's HTTP API in alert links (Alertmanager generatorURL); default http://<web_host>:<web_port>.")
    alert_source: str = Field("gradeflow", description="Source/instance name shown in alerts.")
    alert_max_age_s: float = Field(
        86400.0, ge=0, description="Alerts produced longer ago than this are not sent (a new deployment reading "
                                   "grade-alerts from its beginning must not page for last month); 0: no limit.")

    # --- on-call delivery: rate limits and the alert-storm guard (streams/downstream/alerts/) ----------
    alert_webhook_rate_per_min: float = Field(600.0, gt=0, description="Most requests a minute to the generic webhook, per worker process.")
    alert_slack_rate_per_min: float = Field(60.0, gt=0, description="Most messages a minute to the Slack webhook, per worker process (Slack allows about one a second).")
    alert_pagerduty_rate_per_min: float = Field(120.0, gt=0, description="Most events a minute to PagerDuty per routing key, per worker process (PagerDuty's limit is 120).")
    alert_alertmanager_rate_per_min: float = Field(600.0, gt=0, description="Most requests a minute to the Alertmanagers (all URLs together), per worker process; a re-send carries up to 500 alerts.")
    alert_storm_threshold: int = Field(
        50, ge=0, description="Pages (alerts to the sinks) per storm window, all customers together, past which further "
                              "ones are folded into one summary alert per window; 0: never fold.")
    alert_storm_window_s: float = Field(300.0, gt=0, description="The alert-storm window, in seconds.")
    alert_webhook_secret: SecretStr | None = Field(
        None, description="Signs every generic-webhook request: X-Gradeflow-Signature: v1=HMAC-SHA256(secret, "
                          "timestamp + '.' + body) with X-Gradeflow-Timestamp (never logged); unset: unsigned.")

    # --- connection to the Kafka cluster (see streams/kafka_config.py) -------------------
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    kafka_sasl_mechanism: SaslMechanism = Field(
        "SCRAM-SHA-512", description="SASL mechanism when the protocol is SASL_*: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (never logged). Prefer kafka_sasl_password_file.")
    kafka_sasl_password_file: Path | None = Field(
        None, description="File holding the SASL password (e.g. a mounted Kubernetes Secret); trailing newline ignored.")
    kafka_ssl_ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates; system CAs when unset.")
    kafka_ssl_cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS).")
    kafka_ssl_key_file: Path | None = Field(None, description="PEM private key of the client certificate.")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="Password of the client key, if encrypted.")
    kafka_ssl_check_hostname: bool = Field(True, description="Check that the broker certificate names the host.")
    kafka_client_id: str = Field("gradeflow", description="Kafka client.id of the worker's clients (quotas, broker logs).")
    kafka_session_timeout_s: float = Field(
        60.0, ge=1, le=90, description="Consumer group session timeout: how long a crashed worker's partitions wait "
                                       "before another worker takes them over.")
    kafka_heartbeat_interval_s: float = Field(3.0, gt=0, description="Consumer group heartbeat interval.")
    kafka_fetch_max_wait_ms: int = Field(
        20, ge=0, le=10_000, description="Longest a fetch waits at the broker for data (the consumer's fetch.max.wait.ms; "
                                         "Faust's 1,500 ms let idle partitions stall busy ones: docs/performance.md, \"Fetch wait and idle partitions\").")
    topic_prefix: str = Field(
        "", description="Prepended to every topic name and to the app id (so also to changelog topics and the "
                        "consumer group), for clusters with prefixed ACLs, e.g. 'team-risk.'.")

    # --- topic layout (streams/topics.py: `gradeflow topics create|check`) -------------------
    min_insync_replicas: int = Field(1, ge=1, description="min.insync.replicas of every topic gradeflow creates.")
    create_topics: bool = Field(True, description="The worker creates missing topics at start (needs CREATE ACL).")
    grade_changes_cleanup_policy: Literal["compact", "delete", "compact,delete"] = Field(
        "compact", description="cleanup.policy of the grade-changes topic.")
    input_retention_ms: int | None = Field(
        None, description="retention.ms of the input topics gradeflow creates; broker default when unset.")
    alerts_retention_ms: int = Field(28 * DAY_MS, ge=1, description="retention.ms of the alerts topic.")
    dead_letters_retention_ms: int = Field(28 * DAY_MS, ge=1, description="retention.ms of the dead-letter topic.")
    alert_dead_letters_retention_ms: int = Field(28 * DAY_MS, ge=1, description="retention.ms of the alert dead-letter topic.")

    # --- grade history per customer and ladder (streams/downstream/history.py, docs/downstream.md) ---
    history_max_changes: int = Field(
        100, ge=1, le=10_000, description="Grade changes kept per customer and ladder in the Redis history "
                                          "(GET /customers/{id}/history, gradeflow explain); the oldest go first.")
    history_max_age_days: float = Field(
        400.0, gt=0, le=3650, description="History changes older than this many days before the customer's newest "
                                          "change on that ladder (event time) are dropped, but for the one in "
                                          "effect at that limit.")
    # --- processing guarantee (streams/faustext/transactions.py, docs/guarantees.md) -----------
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="at_least_once: after a crash an output may be published twice (same id); "
                                     "exactly_once: each batch's outputs, states and input offsets commit in one "
                                     "Kafka transaction per input partition, for read_committed consumers "
                                     "(docs/guarantees.md); needs memory://.")

    # --- the clock: re-grading by time alone (streams/clock.py, docs/clock.md) ---------------
    clock: Literal["wall", "event", "off"] = Field(
        "wall", description="What time it is for re-grading without events: wall (now), event (per input "
                            "partition, the highest event time applied: replay and backfill), off (events only).")
    clock_tick_s: float = Field(1.0, gt=0, description="Seconds between wakes of the customers that are due.")
    at_risk_horizon_days: float = Field(
        7.0, ge=0, description="At-risk warning: a key customer whose grade time alone will lower within this many "
                               "days gets one warning (kind at_risk on the alerts topic) before it happens; 0: none. "
                               "Needs the clock (not off).")
    at_risk_severity: Literal["info", "warning", "critical"] = Field(
        "info", description="Severity of at-risk warnings (GRADEFLOW_ALERT_ROUTES sends them to that severity's sinks).")
    event_clock_idle_s: float | None = Field(
        None, gt=0, description="With clock=event: after this many seconds of wall time without a new event on an "
                                "input partition, its clock follows wall time (never, when unset).")

    # --- customer erasure (streams/erasure.py, docs/erasure.md) ----------------------------
    erasure_key: SecretStr | None = Field(
        None, min_length=32, description="Secret of the refusal markers erasure leaves (HMAC-SHA256 of the customer id; "
                                         "at least 32 characters, never logged, the same on every worker and never "
                                         "changed); unset: erasure is off (no erasure topics, `customers erase` refused).")
    topic_customer_erasures: str = Field(
        "customer-erasures", description="Erasure requests (`gradeflow customers erase`); as many partitions as the inputs.")
    topic_erasure_markers: str = Field(
        "erasure-markers", description="Refusal markers of erased customers (compacted; no personal data).")
    topic_erasure_receipts: str = Field(
        "erasure-receipts", description="One receipt per completed erasure, for downstream services to erase too.")
    erasure_requests_retention_ms: int = Field(
        7 * DAY_MS, ge=1, description="retention.ms of the erasure request topic (it names the customers).")
    erasure_receipts_retention_ms: int = Field(
        28 * DAY_MS, ge=1, description="retention.ms of the erasure receipt topic (it names the customers).")
    erasure_markers_retention_ms: int | None = Field(
        None, ge=1, description="retention.ms of the refusal markers (compact,delete); unset: kept for ever (compact). "
                                "Must be at least input_retention_ms: a marker must outlive the events it refuses.")
    # --- shadow rulesets: candidates graded beside the active one (rules/shadow.py, docs/rules-lifecycle.md) ---
    shadow_rulesets: str = Field(
        "", description="Candidate rulesets graded beside the active one on the same state and events, "
                        "comma-separated presets or rule files (like GRADEFLOW_RULESET); each needs another "
                        "version than the active one. Their grades go only to the shadow-diffs topic.")
    topic_shadow_diffs: str = Field(
        "grade-shadow-diffs", description="Compacted topic (key = customer_id) of each customer's active and "
                                          "shadow grades, published when they change (with shadow rulesets).")

    # --- identity merges (streams/merging.py, docs/customers.md) ---------------------------
    customer_merges: bool = Field(
        False, description="Merge two customer ids into one (`gradeflow customers merge FROM INTO`): declares the "
                           "merge topic and runs its steps. Once a merge was done, keep it on: later events of the "
                           "merged-away id go through that topic.")
    topic_customer_merges: str = Field(
        "customer-merges", description="Merge requests and steps, and later events of merged-away ids; as many "
                                       "partitions as the inputs.")
    # --- promotion and rollback of a ruleset (streams/rules_control.py, docs/rules-lifecycle.md) ---
    rules_regrade_chunk: int = Field(
        500, ge=1, le=100_000, description="Customers per step of the re-grade after a ruleset change; each step "
                                           "holds the worker's writer lock, so batches wait at most one step.")
    rules_regrade_pause_s: float = Field(
        0.0, ge=0, le=60, description="Seconds between two steps of the re-grade after a ruleset change: slows it "
                                      "down so that it takes less from live grading; 0: none.")
    alert_fold_rules_changes: bool = Field(
        True, description="Pages caused by a ruleset change (cause rules) are not sent one by one but counted in one "
                          "summary alert per ladder and storm window, whatever GRADEFLOW_ALERT_STORM_THRESHOLD; "
                          "false: they are pages like any other.")

    @field_validator("alert_alertmanager_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # GRADEFLOW_ALERT_ALERTMANAGER_URL= (empty) switches the sink off, as for the other sinks.
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretUrl) -> SecretUrl:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL (got scheme {scheme!r})")
        return value

    @model_validator(mode="after")
    def _check_kafka(self) -> "Settings":
        if self.replication_factor is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed "
                             f"replication_factor ({self.replication_factor})")
        if self.kafka_security_protocol.startswith("SASL_"):
            if not self.kafka_sasl_username:
                raise ValueError(f"security protocol {self.kafka_security_protocol} needs GRADEFLOW_KAFKA_SASL_USERNAME")
            if self.kafka_sasl_password is None and self.kafka_sasl_password_file is None:
                raise ValueError(f"security protocol {self.kafka_security_protocol} needs "
                                 "GRADEFLOW_KAFKA_SASL_PASSWORD or GRADEFLOW_KAFKA_SASL_PASSWORD_FILE")
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise ValueError("set GRADEFLOW_KAFKA_SASL_PASSWORD or GRADEFLOW_KAFKA_SASL_PASSWORD_FILE, not both")
        if self.kafka_heartbeat_interval_s * 3 > self.kafka_session_timeout_s:
            raise ValueError("kafka_heartbeat_interval_s must be at most a third of kafka_session_timeout_s")
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError("GRADEFLOW_KAFKA_SSL_CERT_FILE and GRADEFLOW_KAFKA_SSL_KEY_FILE go together")
        scheme, sep, _rest = self.store.partition("://")
        if not sep or scheme not in ("memory", "rocksdb"):
            # Faust would only say, deep in its start, that it cannot import a driver module.
            raise ValueError(f"GRADEFLOW_STORE must be memory:// or rocksdb:// (got {self.store!r})")
        if self.standby_replicas and scheme == "memory":
            # Faust's memory store drops standby copies after every rebalance and replays a promoted
            # one from the beginning: the standby would cost a second copy and buy nothing.
            raise ValueError("GRADEFLOW_STANDBY_REPLICAS needs GRADEFLOW_STORE=rocksdb:// (the memory store "
                             "keeps no standby copy across a rebalance)")
        if self.processing_guarantee == "exactly_once" and scheme != "memory":
            # A RocksDB volume keeps what a transaction wrote to the table before the transaction
            # was aborted by a crash, and a restart on it would trust that state.
            raise ValueError("GRADEFLOW_PROCESSING_GUARANTEE=exactly_once needs GRADEFLOW_STORE=memory:// "
                             "(a RocksDB volume may hold state of an aborted transaction)")
        return self

    @model_validator(mode="after")
    def _check_erasure(self) -> "Settings":
        markers, inputs = self.erasure_markers_retention_ms, self.input_retention_ms
        if markers is not None and (inputs is None or inputs < 0 or markers < inputs):
            # A marker gone before the events it refuses would let a replay bring the customer back.
            raise ValueError("GRADEFLOW_ERASURE_MARKERS_RETENTION_MS must be at least GRADEFLOW_INPUT_RETENTION_MS, "
                             "which must then be set and finite (unset the former to keep markers for ever)")
        return self

    @property
    def group_id(self) -> str:
        """The Faust app id: consumer group and prefix of changelog topics, with ``topic_prefix``."""
        return f"{self.topic_prefix}{self.app_id}"

    @property
    def topics(self) -> TopicNames:
        """Full topic names, ``topic_prefix`` applied."""
        p = self.topic_prefix
        return TopicNames(p + self.topic_transactions, p + self.topic_interactions, p + self.topic_grade_changes,
                          p + self.topic_alerts, p + self.topic_dead_letters, p + self.topic_alert_dead_letters)

    def changelog_topic(self, table: str) -> str:
        """The changelog topic Faust uses for ``table`` (``<app id>-<table>-changelog``)."""
        return f"{self.group_id}-{table}-changelog"


def alert_retries_topic(settings: Settings) -> str:
    """The full name of the alert retry topic: the app's own unless set."""
    if settings.topic_alert_retries:
        return settings.topic_prefix + settings.topic_alert_retries
    return f"{settings.group_id}-alert-retries"


def shadow_diffs_topic(settings: Settings) -> str:
    """The full name of the grade-shadow-diffs topic, ``topic_prefix`` applied."""
    return settings.topic_prefix + settings.topic_shadow_diffs


def shadow_ruleset_names(settings: Settings) -> list[str]:
    """The presets or rule files of ``GRADEFLOW_SHADOW_RULESETS``, in order (empty: none)."""
    return [name.strip() for name in settings.shadow_rulesets.split(",") if name.strip()]


def rules_control_topic(settings: Settings) -> str:
    """The full name of the rules-control topic (``<app id>-rules-control``): the active ruleset of
    every worker of the app and their re-grade progress (streams/rules_control.py)."""
    return f"{settings.group_id}-rules-control"


def redis_prefix(settings: Settings) -> str:
    """The Redis key prefix: ``GRADEFLOW_REDIS_PREFIX``, else the app id."""
    return settings.redis_prefix or settings.group_id


def secret_values(settings: Settings) -> list[str]:
    """Every credential the settings hold, as plain strings (the longest first), to scrub text of.

    Each secret field's value, the password of each secret URL, and the Kafka password file's content.
    """
    found: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            plain = value.get_secret_value()
            found.add(plain)
            parts = urlsplit(plain)
            if isinstance(value, SecretUrl):
                found.update(p for p in (parts.password,) if p)
                found.update(v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY_KEYS)
            elif parts.scheme and parts.netloc:
                # A webhook URL: its path (Slack's key is the last segment) and query carry the credential.
                found.update((parts.path, parts.path.rstrip("/").rpartition("/")[2]))
                found.update(v for _k, v in parse_qsl(parts.query))
    if settings.kafka_sasl_password_file is not None:
        try:
            found.add(settings.kafka_sasl_password_file.read_text().rstrip("\r\n"))
        except OSError:
            pass
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def redact(text: str, settings: Settings) -> str:
    """``text`` with every credential of ``settings`` replaced by ``***``.

    Messages gradeflow writes never include a secret; this is the safety net for
    text it does not write itself (a client library's exception).
    """
    for secret in secret_values(settings):
        text = text.replace(secret, "***")
    return text


def describe_settings(settings: Settings) -> list[tuple[str, str]]:
    """(field name, value as shown to people) of every setting; secrets masked, URLs with their password masked."""
    import json

    rows = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            shown = ""
        elif isinstance(value, SecretStr):
            shown = str(value)
        elif isinstance(value, (dict, list)):
            shown = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            shown = str(value).lower()
        else:
            shown = str(value)
        rows.append((name, shown))
    return rows


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (CLI options) on top.

    Invalid settings raise :class:`schemas.errors.ConfigurationError` with one
    line per problem; secret values are never part of the message.
    """
    from pydantic import ValidationError

    from schemas.errors import ConfigurationError

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"GRADEFLOW_{where.upper()}: {msg}" if where else msg)
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class ErasureTopics:
    """The full names of the erasure topics (``topic_prefix`` applied)."""

    requests: str
    markers: str
    receipts: str


def merges_topic(settings: Settings) -> str:
    """The full name of the merge topic (``topic_prefix`` applied)."""
    return settings.topic_prefix + settings.topic_customer_merges


def erasure_topics(settings: Settings) -> ErasureTopics:
    p = settings.topic_prefix
    return ErasureTopics(p + settings.topic_customer_erasures, p + settings.topic_erasure_markers,
                         p + settings.topic_erasure_receipts)
