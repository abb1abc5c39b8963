"""Kafka client options from :class:`streams.settings.Settings`, for every client gradeflow runs.

One mapping, three consumers: the Faust app (aiokafka underneath), the admin
client of ``gradeflow topics`` (kafka-python) and the producer/consumer helpers
of :mod:`streams.tools.local` (kafka-python). All of them get the same TLS context
and the same SASL credentials, so a setting that works for one works for all.

Secrets (the SASL password, the key password) are read here and handed to the
clients only; nothing in this module formats them into a message.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from schemas.errors import ConfigurationError, ServerUnavailable
from streams.settings import Settings


def bootstrap_list(settings: Settings) -> list[str]:
    """The bootstrap servers as a list of ``host:port`` (a ``kafka://`` prefix is dropped)."""
    out = []
    for item in settings.kafka_bootstrap.split(","):
        item = item.strip()
        if item.startswith("kafka://"):
            item = item[len("kafka://"):]
        if item:
            out.append(item)
    return out


def unreachable_message(settings: Settings) -> str:
    """The one line a user sees when no broker answers."""
    return (f"gradeflow: no Kafka broker answers at {settings.kafka_bootstrap} (GRADEFLOW_KAFKA_BOOTSTRAP); "
            f"start the local one with `deploy/local/up`, or point GRADEFLOW_KAFKA_BOOTSTRAP at your cluster")


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def _readable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigurationError(f"{what} {path} does not exist or is not a file")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ConfigurationError(f"{what} {path} cannot be read ({exc.strerror})") from None
    return path


def sasl_password(settings: Settings) -> str | None:
    """The SASL password, from ``kafka_sasl_password`` or the file named by ``kafka_sasl_password_file``."""
    if settings.kafka_sasl_password is not None:
        return settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_sasl_password_file is not None:
        path = _readable(settings.kafka_sasl_password_file, "GRADEFLOW_KAFKA_SASL_PASSWORD_FILE")
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
        if not value:
            raise ConfigurationError(f"GRADEFLOW_KAFKA_SASL_PASSWORD_FILE {path} is empty")
        return value
    return None


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of every Kafka client, or None when the protocol has no TLS."""
    if not uses_tls(settings):
        return None
    ca = settings.kafka_ssl_ca_file
    if ca is not None:
        _readable(ca, "GRADEFLOW_KAFKA_SSL_CA_FILE")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    except ssl.SSLError as exc:
        raise ConfigurationError(f"GRADEFLOW_KAFKA_SSL_CA_FILE {ca} holds no usable PEM certificate ({exc.reason})") from None
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
        cert = _readable(settings.kafka_ssl_cert_file, "GRADEFLOW_KAFKA_SSL_CERT_FILE")
        key = _readable(settings.kafka_ssl_key_file, "GRADEFLOW_KAFKA_SSL_KEY_FILE")
        password = settings.kafka_ssl_key_password.get_secret_value() if settings.kafka_ssl_key_password else None
        try:
            ctx.load_cert_chain(str(cert), str(key), password=password)
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ConfigurationError(f"cannot load the client certificate {cert} with key {key} ({reason})") from None
    return ctx


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App(...)``: credentials, client id, group timeouts.

    Faust passes ``broker_credentials`` to aiokafka for the consumer, the
    producer and the topic admin it uses to create changelog topics.
    """
    import faust

    options: dict[str, Any] = {
        "broker_client_id": settings.kafka_client_id,
        "broker_session_timeout": settings.kafka_session_timeout_s,
        "broker_heartbeat_interval": settings.kafka_heartbeat_interval_s,
    }
    ctx = ssl_context(settings)
    if uses_sasl(settings):
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=sasl_password(settings),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ctx,  # None → SASL_PLAINTEXT, a context → SASL_SSL
        )
    elif ctx is not None:
        options["broker_credentials"] = faust.SSLCredentials(ctx)
    return options


def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's KafkaAdminClient, KafkaProducer and KafkaConsumer."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_list(settings),
        "security_protocol": settings.kafka_security_protocol,
    }
    ctx = ssl_context(settings)
    if ctx is not None:
        options["ssl_context"] = ctx
    if uses_sasl(settings):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = sasl_password(settings)
    return options


def describe_connection(settings: Settings) -> str:
    """A secret-free description of how gradeflow connects, for start-up lines and errors."""
    parts = [settings.kafka_bootstrap, settings.kafka_security_protocol]
    if uses_sasl(settings):
        parts.append(f"{settings.kafka_sasl_mechanism} user {settings.kafka_sasl_username}")
    if uses_tls(settings) and settings.kafka_ssl_ca_file:
        parts.append(f"CA {settings.kafka_ssl_ca_file}")
    return " ".join(parts)


def tcp_answers(settings: Settings, timeout_s: float = 2.0) -> bool:
    """True if some bootstrap server accepts a TCP connection (whatever it speaks)."""
    for hp in bootstrap_list(settings):
        host, _, port = hp.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def check_tls(settings: Settings, timeout_s: float = 5.0) -> None:
    """Open a TLS connection to the first bootstrap server that answers; explain a failure in one line.

    Kafka clients report an untrusted certificate as "no broker available"
    after a timeout; this says what is wrong at once. No-op without TLS.
    """
    ctx = ssl_context(settings)
    if ctx is None:
        return
    for hp in bootstrap_list(settings):
        host, _, port = hp.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
                with ctx.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            where = f"CA file {settings.kafka_ssl_ca_file}" if settings.kafka_ssl_ca_file else "the system CAs"
            raise ConfigurationError(
                f"TLS to {hp} failed: the broker certificate is not trusted by {where} "
                f"({exc.verify_message}); check GRADEFLOW_KAFKA_SSL_CA_FILE") from None
        except ssl.SSLError as exc:
            raise ConfigurationError(f"TLS to {hp} failed ({exc.reason}); is {hp} a TLS listener? "
                                     f"GRADEFLOW_KAFKA_SECURITY_PROTOCOL is {settings.kafka_security_protocol}") from None
        except (OSError, ValueError):
            continue
    raise ServerUnavailable(unreachable_message(settings))
