"""The topics gradeflow uses, and their creation with Kafka's admin API.

Inputs and the tables' changelogs must have the same number of partitions
(co-partitioning); the worker's table changelog is created by Faust itself
with the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import NoBrokersAvailable, TopicAlreadyExistsError

from schemas.errors import ServerUnavailable
from streams.settings import Settings

WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic gradeflow reads or writes, with its configuration."""
    delete_week = {"cleanup.policy": "delete", "retention.ms": str(4 * WEEK_MS)}
    return [
        TopicSpec(settings.topic_transactions, {}),
        TopicSpec(settings.topic_interactions, {}),
        TopicSpec(settings.topic_grade_changes, {"cleanup.policy": "delete", "retention.ms": str(52 * WEEK_MS)}),
        TopicSpec(settings.topic_alerts, delete_week),
        TopicSpec(settings.topic_dead_letters, delete_week),
    ]


def bootstrap_list(settings: Settings) -> list[str]:
    """The bootstrap servers as a list of host:port."""
    return [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()]


def unreachable_message(settings: Settings) -> str:
    """The one line a user sees when no broker answers."""
    return (f"gradeflow: no Kafka broker answers at {settings.kafka_bootstrap} (GRADEFLOW_KAFKA_BOOTSTRAP); "
            f"start the local one with `deploy/local/up`, or point GRADEFLOW_KAFKA_BOOTSTRAP at your cluster")


def admin_client(settings: Settings, timeout_s: float = 10.0) -> KafkaAdminClient:
    """A connected admin client, or :class:`ServerUnavailable` naming the address."""
    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap_list(settings),
            client_id=f"{settings.app_id}-admin",
            request_timeout_ms=int(timeout_s * 1000),
            api_version_auto_timeout_ms=int(timeout_s * 1000),
        )
    except (NoBrokersAvailable, ValueError, OSError) as exc:
        raise ServerUnavailable(unreachable_message(settings)) from exc


def create_topics(settings: Settings) -> list[str]:
    """Create every missing topic; return the names created (idempotent)."""
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        created = []
        for spec in topic_specs(settings):
            if spec.name in existing:
                continue
            try:
                admin.create_topics([NewTopic(spec.name, settings.partitions, settings.replication_factor,
                                              topic_configs=spec.config)])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
