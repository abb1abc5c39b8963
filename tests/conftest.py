"""Shared fixtures. Broker tests talk to the real local Kafka (deploy/local/up)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest

from streams.tools.local import WorkerProcess, drop_run, unique_env


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The bootstrap address of the running local broker; fails (never skips) without one."""
    from schemas.errors import ServerUnavailable
    from streams.settings import load_settings
    from streams.topics import admin_client

    settings = load_settings()
    try:
        admin_client(settings, timeout_s=5.0).close()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    return settings.kafka_bootstrap


@pytest.fixture
def worker_factory(bootstrap: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on unique topics; at teardown every worker started is stopped and its topics deleted.

    Call ``worker_factory()`` for a fresh set of names, or pass ``env=`` of an
    earlier worker to join the same app (a second worker, a restart).
    """
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None, name: str | None = None, **extra: str) -> WorkerProcess:
        env = dict(env) if env is not None else unique_env("test", **extra)
        env.setdefault("GRADEFLOW_KAFKA_BOOTSTRAP", bootstrap)
        worker = WorkerProcess(env, name=name or f"worker{len(started) + 1}")
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
    for env in {w.env["GRADEFLOW_APP_ID"]: w.env for w in started}.values():
        audit_outputs(env, [w.env for w in started if w.env["GRADEFLOW_APP_ID"] == env["GRADEFLOW_APP_ID"]])
    for env in {w.env["GRADEFLOW_APP_ID"]: w.env for w in started}.values():
        try:
            drop_run(env.get("GRADEFLOW_KAFKA_BOOTSTRAP", bootstrap), env)  # the cluster the workers used
        except Exception as exc:  # noqa: BLE001 - a test's outcome does not depend on the clean-up
            warnings.warn(f"could not delete the topics of {env['GRADEFLOW_APP_ID']}: {exc!r}", stacklevel=2)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GRADEFLOW_ variable of the environment the tests run in: settings from defaults and what
    the test sets."""
    import os

    for key in list(os.environ):
        if key.startswith("GRADEFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


def audit_outputs(env: dict[str, str], envs: list[dict[str, str]]) -> None:
    """The invariants of grade-changes (streams/tools/audit.py) on what a test's workers published: every
    chain valid, as_of never backwards, a change delivered twice identical, and, when every worker
    ran one ruleset, each key downgrade with exactly one alert. Outputs only: a test's history
    decides what the offline run would be, and its own assertions compare with that."""
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.tools.audit import Audit, read_cluster, read_erasures
    from streams.settings import load_settings

    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items() if k.startswith("GRADEFLOW_")})
    rulesets = {e.get("GRADEFLOW_RULESET", settings.ruleset) for e in envs}
    from kafka.errors import KafkaError

    from schemas.errors import ServerUnavailable

    try:
        _inputs, changes, alerts = read_cluster(settings)
        erasures = read_erasures(settings)
    except (ServerUnavailable, KafkaError) as exc:  # a test that took its cluster away: nothing to read
        warnings.warn(f"outputs of {env['GRADEFLOW_APP_ID']} not audited: {exc!r}", stacklevel=2)
        return
    audit = Audit(compile_ruleset(load(settings.ruleset)), clock=settings.clock, erasures=erasures)
    report = audit.check([], changes, alerts if len(rulesets) == 1 else None, offline=False)
    assert report.ok, f"the outputs of {env['GRADEFLOW_APP_ID']} break an invariant:\n{report.render()}"


# Fixtures that need a local server: `bootstrap` (Kafka) and `redis_prefix` (the Redis key prefix
# of the downstream tests in tests/streams, which talk to the real Redis).
SERVER_FIXTURES = frozenset({"bootstrap", "redis_prefix"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that need the local servers are marked so that `pytest -m "not broker"` runs the fast set alone.
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


