"""Credentials in settings are secret types end to end: masked in reprs, in the CLI's output, in the
worker's log and on its HTTP pages, and used (unmasked) only where a client needs them."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.streams.downstream_helpers import StandIn, wait_until
from tests.streams.redishelp import RedisServer
from schemas.errors import ConfigurationError
from streams.tools.local import ROOT, WorkerProcess, drop_run, free_port, produce, unique_env
from streams.settings import SecretUrl, describe_settings, load_settings, masked_url, redact, secret_values
from tests.streams.downstream.test_alerts import key_customers

REDIS_PASSWORD = "s3cr3t-redis-XYZ"
SECRETS = {
    "GRADEFLOW_API_TOKEN": "s3cr3t-token-XYZ",
    "GRADEFLOW_ALERT_PAGERDUTY_ROUTING_KEY": "s3cr3t-pagerduty-XYZ",
    "GRADEFLOW_KAFKA_SASL_PASSWORD": "s3cr3t-sasl-XYZ",
    "GRADEFLOW_KAFKA_SSL_KEY_PASSWORD": "s3cr3t-sslkey-XYZ",
}
# Secrets that sit inside URLs (the URLs themselves are set per test: they name a stand-in's port).
SLACK_SECRET = "s3cr3t-slack-XYZ"
WEBHOOK_SECRET = "s3cr3t-webhook-XYZ"
ALERTMANAGER_SECRET = "s3cr3t-am-XYZ"
EVERY_SECRET = [*SECRETS.values(), REDIS_PASSWORD, SLACK_SECRET, WEBHOOK_SECRET, ALERTMANAGER_SECRET]


def secret_env(standin_port: int, redis_port: int) -> dict[str, str]:
    base = f"http://127.0.0.1:{standin_port}"
    return {
        **SECRETS,
        "GRADEFLOW_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0",
        "GRADEFLOW_ALERT_SLACK_WEBHOOK_URL": f"{base}/slack/T0/B0/{SLACK_SECRET}",
        "GRADEFLOW_ALERT_WEBHOOK_URL": f"{base}/hook?token={WEBHOOK_SECRET}",
        "GRADEFLOW_ALERT_PAGERDUTY_URL": f"{base}/pagerduty/v2/enqueue",
        "GRADEFLOW_ALERT_ALERTMANAGER_URL": f"http://am:{ALERTMANAGER_SECRET}@127.0.0.1:{standin_port}/am",
    }


def leaks(text: str) -> list[str]:
    return [s for s in EVERY_SECRET if s in text]



# ----------------------------------------------------------------------------- without servers


def test_every_credential_is_a_secret_type_masked_in_repr_str_and_json(clean_env):
    for key, value in secret_env(8080, 6380).items():
        clean_env.setenv(key, value)
    settings = load_settings()
    for name in ("api_token", "alert_pagerduty_routing_key", "alert_slack_webhook_url", "alert_webhook_url",
                 "kafka_sasl_password", "kafka_ssl_key_password", "redis_url", "alert_alertmanager_url"):
        assert isinstance(getattr(settings, name), SecretStr), name
    assert isinstance(settings.redis_url, SecretUrl) and isinstance(settings.alert_alertmanager_url, SecretUrl)
    shown = "\n".join([repr(settings), str(settings), settings.model_dump_json(),
                       "\n".join(f"{n}={v}" for n, v in describe_settings(settings))])
    assert leaks(shown) == []
    # The host and port of a URL stay readable; only its password is masked.
    assert str(settings.redis_url) == "redis://:***@127.0.0.1:6380/0"
    assert str(settings.alert_alertmanager_url) == "http://am:***@127.0.0.1:8080/am"
    # ... and the clients get the real value.
    assert settings.redis_url.get_secret_value().endswith(f":{REDIS_PASSWORD}@127.0.0.1:6380/0")
    assert settings.api_token.get_secret_value() == SECRETS["GRADEFLOW_API_TOKEN"]
    assert set(EVERY_SECRET) <= set(secret_values(settings))
    assert leaks(redact("rejected " + " and ".join(EVERY_SECRET), settings)) == []


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:pw@h:6380/2", "rediss://user:***@h:6380/2"),
    ("redis://user@h:6379/0", "redis://user@h:6379/0"),
    ("redis://h:6379/0?password=pw&socket_timeout=3", "redis://h:6379/0?password=***&socket_timeout=3"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
])
def test_a_secret_url_masks_only_its_credentials(url, shown):
    assert masked_url(url) == shown


def test_a_bad_redis_url_is_refused_by_name_without_repeating_it(clean_env):
    for bad in (f"http://:{REDIS_PASSWORD}@h:1/0", f"{REDIS_PASSWORD}"):
        with pytest.raises(ConfigurationError) as err:
            load_settings(redis_url=bad)
        assert "GRADEFLOW_REDIS_URL" in str(err.value) and leaks(str(err.value)) == []


# ----------------------------------------------------------------------------- the CLI and a worker


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password=REDIS_PASSWORD).start()
    yield server
    server.stop()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_no_command_and_no_worker_page_or_log_shows_a_secret(bootstrap, redis_with_password):
    standin = StandIn().start()
    env = {**unique_env("secrets"), **secret_env(standin.port, redis_with_password.port),
           "GRADEFLOW_KAFKA_BOOTSTRAP": bootstrap, "GRADEFLOW_WEB_PORT": str(free_port()),
           "GRADEFLOW_ALERT_ATTEMPTS": "2", "GRADEFLOW_ALERT_BACKOFF_S": "0.05"}
    outputs: list[tuple[str, str]] = []

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = run_cli(env, *args)
        outputs.append((" ".join(args), result.stdout + result.stderr))
        if ok:
            assert result.returncode == 0, f"gradeflow {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    worker = WorkerProcess(env, name="secrets")
    try:
        shown = cli("settings").stdout
        assert f"GRADEFLOW_REDIS_URL=redis://:***@127.0.0.1:{redis_with_password.port}/0" in shown
        assert "GRADEFLOW_API_TOKEN=**********" in shown
        cli("topics", "create")
        cli("topics", "check")
        cli("redis", "rebuild")  # an empty grade-changes topic
        cli("redis", "rebuild", "--redis-url", f"redis://:wrong-{REDIS_PASSWORD}@127.0.0.1:"
                                               f"{redis_with_password.port}/0", ok=False)  # refused: named, not shown
        cli("rules", "check", "rfm-5")
        cli("--help")

        worker.start()
        first, drops, _ = key_customers(2)
        produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], first + drops)
        # The secrets reached the sinks and Redis (each was used, unmasked, where it is needed) ...
        wait_until(lambda: len(standin.delivered(f"/slack/T0/B0/{SLACK_SECRET}")) >= 2
                   and len(standin.delivered("/pagerduty/v2/enqueue")) >= 2 and len(standin.delivered("/hook")) >= 2,
                   timeout=90, what=f"alerts at every sink; worker log:\n{worker.tail()}")
        assert {b["routing_key"] for b in standin.delivered("/pagerduty/v2/enqueue")} == {
            SECRETS["GRADEFLOW_ALERT_PAGERDUTY_ROUTING_KEY"]}
        assert redis_with_password.client().exists(f"{env['GRADEFLOW_APP_ID']}:customer:k000")
        base = f"http://127.0.0.1:{env['GRADEFLOW_WEB_PORT']}"
        token = SECRETS["GRADEFLOW_API_TOKEN"]
        # ... and no page shows one: with the token, and without it (401).
        for path in ("/metrics", "/openapi.json", "/customers/k000", "/grades", "/healthz", "/readyz"):
            status, body = http_get(base + path, token)
            assert status == 200, (path, status, body)
            outputs.append((f"GET {path}", body))
        assert http_get(base + "/metrics")[0] == 401
        assert worker.stop() == 0
        cli("redis", "rebuild")  # now with grade changes to apply
        outputs.append(("worker log", worker.log_path.read_text(errors="replace")))
        outputs.append(("repr(settings)", repr(load_settings(**{k.removeprefix("GRADEFLOW_").lower(): v
                                                                 for k, v in env.items()}))))
        for where, text in outputs:
            assert leaks(text) == [], f"{where} shows {leaks(text)}:\n{text[-3000:]}"
    finally:
        worker.stop()
        standin.stop()
        drop_run(bootstrap, env)
