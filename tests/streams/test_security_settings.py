"""Kafka connection settings: environment → Settings → Faust/aiokafka and kafka-python options."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import faust
import pytest

from schemas.errors import ConfigurationError
from streams.tools.cli import _settings, build_parser
from streams.kafka_config import describe_connection, faust_broker_options, kafka_python_options
from streams.settings import Settings, load_settings

SECRET = "s3cr3t-Pa55word-do-not-log"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                    "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem")], check=True, capture_output=True)
    return d / "ca.pem"



def test_defaults_are_plaintext_without_credentials(clean_env):
    s = load_settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert faust_broker_options(s) == {"broker_client_id": "gradeflow", "broker_session_timeout": 60.0,
                                       "broker_heartbeat_interval": 3.0}
    opts = kafka_python_options(s)
    assert opts == {"bootstrap_servers": ["localhost:9092"], "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_from_environment_with_password_file(clean_env, tmp_path, ca_file):
    pw = tmp_path / "password"
    pw.write_text(SECRET + "\n")
    clean_env.setenv("GRADEFLOW_KAFKA_BOOTSTRAP", "kafka://b1:9093, b2:9093")
    clean_env.setenv("GRADEFLOW_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("GRADEFLOW_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    clean_env.setenv("GRADEFLOW_KAFKA_SASL_USERNAME", "grader")
    clean_env.setenv("GRADEFLOW_KAFKA_SASL_PASSWORD_FILE", str(pw))
    clean_env.setenv("GRADEFLOW_KAFKA_SSL_CA_FILE", str(ca_file))
    clean_env.setenv("GRADEFLOW_KAFKA_CLIENT_ID", "risk-grader")
    s = load_settings()

    fo = faust_broker_options(s)
    creds = fo["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL" and creds.mechanism.value == "SCRAM-SHA-256"
    assert creds.username == "grader" and creds.password == SECRET
    assert isinstance(creds.ssl_context, ssl.SSLContext) and creds.ssl_context.check_hostname
    assert fo["broker_client_id"] == "risk-grader"
    # What aiokafka receives from Faust.
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert auth["sasl_plain_password"] == SECRET

    ko = kafka_python_options(s)
    assert ko["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert ko["security_protocol"] == "SASL_SSL" and ko["sasl_mechanism"] == "SCRAM-SHA-256"
    assert ko["sasl_plain_username"] == "grader" and ko["sasl_plain_password"] == SECRET
    assert isinstance(ko["ssl_context"], ssl.SSLContext)

    # Nothing printable carries the secret.
    for text in (repr(s), str(s), describe_connection(s), repr(creds), str(s.model_dump())):
        assert SECRET not in text


def test_ssl_only_and_sasl_plaintext(clean_env, ca_file):
    s = load_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(ca_file))
    creds = faust_broker_options(s)["broker_credentials"]
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"
    s = load_settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                      kafka_sasl_username="u", kafka_sasl_password=SECRET)
    creds = faust_broker_options(s)["broker_credentials"]
    assert creds.protocol.value == "SASL_PLAINTEXT" and creds.ssl_context is None
    assert "ssl_context" not in kafka_python_options(s)


@pytest.mark.parametrize("overrides, words", [
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_password": SECRET}, "GRADEFLOW_KAFKA_SASL_USERNAME"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"}, "GRADEFLOW_KAFKA_SASL_PASSWORD_FILE"),
    ({"kafka_security_protocol": "TLS"}, "GRADEFLOW_KAFKA_SECURITY_PROTOCOL"),
    ({"kafka_sasl_mechanism": "GSSAPI"}, "GRADEFLOW_KAFKA_SASL_MECHANISM"),
    ({"kafka_sasl_password": SECRET, "kafka_sasl_password_file": "/x", "kafka_sasl_username": "u"}, "not both"),
    ({"kafka_ssl_cert_file": "/c.pem"}, "go together"),
    ({"replication_factor": 1, "min_insync_replicas": 2}, "cannot exceed"),
    ({"standby_replicas": 1}, "GRADEFLOW_STANDBY_REPLICAS needs GRADEFLOW_STORE=rocksdb://"),
    ({"store": "rocksdb"}, "GRADEFLOW_STORE must be memory:// or rocksdb:// (got 'rocksdb')"),
    ({"store": "redis://localhost"}, "GRADEFLOW_STORE must be memory:// or rocksdb://"),
])
def test_invalid_settings_say_what_in_one_line_without_secrets(clean_env, overrides, words):
    with pytest.raises(ConfigurationError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert words in message and "\n" not in message and SECRET not in message


def test_standby_replicas_go_with_rocksdb(clean_env):
    assert load_settings(standby_replicas=1, store="rocksdb://").standby_replicas == 1
    assert load_settings(standby_replicas=0).store == "memory://"


def test_unreadable_files_are_named(clean_env, tmp_path):
    s = load_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigurationError, match="GRADEFLOW_KAFKA_SSL_CA_FILE .*nope.pem does not exist"):
        faust_broker_options(s)
    (tmp_path / "bad.pem").write_text("not a certificate")
    s = load_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(tmp_path / "bad.pem"))
    with pytest.raises(ConfigurationError, match="no usable PEM"):
        kafka_python_options(s)
    (tmp_path / "empty").write_text("\n")
    s = load_settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
                      kafka_sasl_password_file=str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError, match="is empty"):
        kafka_python_options(s)


def test_topic_prefix_applies_to_topics_group_and_changelogs(clean_env):
    s = load_settings(topic_prefix="team-risk.", app_id="grader", topic_alerts="alerts")
    assert s.topics.transactions == "team-risk.transactions"
    assert s.topics.alerts == "team-risk.alerts"
    assert s.group_id == "team-risk.grader"
    assert s.changelog_topic("customer-state") == "team-risk.grader-customer-state-changelog"
    assert Settings().topics.grade_changes == "grade-changes"


def test_worker_and_topics_take_the_same_options_as_the_environment(clean_env, tmp_path, ca_file):
    pw = tmp_path / "pw"
    pw.write_text(SECRET)
    argv = ["--bootstrap", "k:9093", "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
            "--sasl-username", "grader", "--sasl-password-file", str(pw), "--ssl-ca-file", str(ca_file),
            "--client-id", "cid", "--topic-prefix", "p.", "--partitions", "12", "--replication-factor", "3",
            "--min-insync-replicas", "2"]
    for command in (["worker"], ["topics", "create"], ["topics", "check"]):
        s = _settings(build_parser().parse_args(command + argv))
        assert (s.kafka_bootstrap, s.kafka_security_protocol, s.kafka_sasl_username) == ("k:9093", "SASL_SSL", "grader")
        assert s.kafka_sasl_password_file == pw and s.kafka_ssl_ca_file == ca_file and s.kafka_client_id == "cid"
        assert (s.topic_prefix, s.partitions, s.replication_factor, s.min_insync_replicas) == ("p.", 12, 3, 2)
    # no option takes the password itself (it would show in `ps`)
    from streams.tools.cli import _CONNECTION_OPTIONS

    assert "kafka_sasl_password" not in _CONNECTION_OPTIONS
