"""All configuration, from ``GRADEFLOW_*`` environment variables, read here only.

Defaults work on a laptop with ``deploy/local/up``. Every variable is listed
in the README's configuration table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """gradeflow settings; each field is ``GRADEFLOW_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="GRADEFLOW_", extra="ignore")

    kafka_bootstrap: str = Field("localhost:9092", description="Kafka bootstrap servers, comma-separated host:port.")
    redis_url: str = Field("redis://localhost:6379/0", description="Redis server URL.")
    app_id: str = Field("gradeflow", description="Consumer group and prefix of the tables' changelog topics.")
    ruleset: str = Field("rfm-5", description="Preset name or path of a ruleset YAML file.")
    topic_transactions: str = "transactions"
    topic_interactions: str = "interactions"
    topic_grade_changes: str = "grade-changes"
    topic_alerts: str = "grade-alerts"
    topic_dead_letters: str = "gradeflow-dead-letters"
    partitions: int = Field(4, ge=1, description="Partitions of every topic gradeflow creates (inputs and changelogs must agree).")
    replication_factor: int = Field(1, ge=1, description="Replication factor of the topics gradeflow creates.")
    data_dir: Path = Field(Path(".local/worker"), description="Worker state directory (table offsets, RocksDB).")
    store: str = Field("memory://", description="Faust table store: memory:// or rocksdb://.")
    web_port: int = Field(6066, description="Port of the worker's HTTP server (bound to web_host).")
    web_host: str = Field("127.0.0.1", description="Address the worker's HTTP server binds to.")
    batch_size: int = Field(2000, ge=1, description="Most records the agent takes per batch.")
    batch_within: float = Field(0.05, gt=0, description="Seconds the agent waits to fill a batch.")
    log_level: str = "info"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (CLI options) on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
