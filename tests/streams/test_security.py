"""A worker on a SASL_SSL (SCRAM-SHA-512) broker made by `deploy/local/up --sasl-ssl`.

Right credentials: it grades. Wrong password, untrusted CA: one line, non-zero exit.
The password appears in no log line and no error message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams.tools.local import ROOT, WorkerProcess, consume, produce, unique_env
from tests.deploy.localcluster import LocalCluster, port_from_env

pytestmark = [pytest.mark.slow, pytest.mark.broker]  # starts its own broker with deploy/local/up
PORT = port_from_env("GRADEFLOW_TEST_SASL_PORT", 2)  # free ports of this run unless set


@pytest.fixture(scope="module")
def sasl_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(PORT, brokers=1, sasl_ssl=True) as cluster:
        yield cluster


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADEFLOW_")}
    return subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=90)


def txn(event_id: str, customer: str, at: str, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({"event_id": event_id, "customer_id": customer, "occurred_at": at,
                                            "type": "purchase", "amount": amount, "currency": "CNY"})


def test_up_prints_the_connection_settings(sasl_cluster):
    env = sasl_cluster.env
    assert env["GRADEFLOW_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{PORT}"
    assert env["GRADEFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["GRADEFLOW_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert Path(env["GRADEFLOW_KAFKA_SSL_CA_FILE"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    pw = Path(env["GRADEFLOW_KAFKA_SASL_PASSWORD_FILE"])
    assert oct(pw.stat().st_mode & 0o777) == "0o600"
    assert set(sasl_cluster.ps()) == {"controller-1", "kafka-1"}
    # `ps` and `down` act on the set named by GRADEFLOW_KAFKA_BOOTSTRAP: the default env never
    # selects this cluster; --all lists every set.
    from tests.deploy.localcluster import PS

    default_env = {k: v for k, v in os.environ.items() if not k.startswith("GRADEFLOW_")}
    default_ps = subprocess.run([str(PS)], env=default_env, capture_output=True, text=True, check=True).stdout
    assert f":{PORT}" not in default_ps and f":{PORT + 1}" not in default_ps
    all_ps = subprocess.run([str(PS), "--all"], env=default_env, capture_output=True, text=True, check=True).stdout
    assert f"kafka-1 {sasl_cluster.ps()['kafka-1'][0]} 127.0.0.1:{PORT}" in all_ps.splitlines()


def test_worker_grades_over_sasl_ssl_and_never_logs_the_password(sasl_cluster):
    conn = dict(sasl_cluster.env)
    password = Path(conn.pop("GRADEFLOW_KAFKA_SASL_PASSWORD_FILE")).read_text().strip()
    # The worker gets the password from the environment, the harder case for leaks.
    env = unique_env("sasl", **conn, GRADEFLOW_KAFKA_SASL_PASSWORD=password)
    worker = WorkerProcess(env, name="worker1")
    outputs: list[str] = []
    try:
        worker.start(ready_timeout=90)
        records = [txn("s1", "sam", "2026-01-01T10:00:00+08:00", "60000"),
                   txn("s2", "sam", "2026-01-02T10:00:00+08:00", "100"),
                   txn("t1", "tia", "2026-01-03T10:00:00+08:00", "10")]
        produce(conn["GRADEFLOW_KAFKA_BOOTSTRAP"], env["GRADEFLOW_TOPIC_TRANSACTIONS"], records, env=env)
        # sam: 5+1+5 = 11 → A, then 5+2+5 = 12, still A (no event); tia: 5+1+1 = 7 → B.
        got = list(consume(conn["GRADEFLOW_KAFKA_BOOTSTRAP"], [env["GRADEFLOW_TOPIC_GRADE_CHANGES"]], until=2,
                           idle_s=30, timeout_s=90, env=env))
        grades = sorted((orjson.loads(v)["customer_id"], orjson.loads(v)["grade"]) for _, _, v in got)
        assert grades == [("sam", "A"), ("tia", "B")], worker.tail()
        # Plaintext clients are refused by the SASL_SSL listener.
        plain = run_cli({**env, "GRADEFLOW_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, "topics", "check")
        assert plain.returncode != 0
        outputs += [plain.stdout, plain.stderr]
        check = run_cli(env, "topics", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        outputs += [check.stdout, check.stderr]
    finally:
        worker.stop()
    log_text = worker.log_path.read_text(errors="replace")
    assert "SASL_SSL SCRAM-SHA-512 user gradeflow" in log_text  # the start line says how it connects
    assert password not in log_text
    assert all(password not in out for out in outputs)


@pytest.mark.parametrize("case", ["wrong password", "untrusted CA"])
def test_bad_credentials_say_so_in_one_line_and_exit_nonzero(sasl_cluster, tmp_path, case):
    env = unique_env("sasl-bad", **sasl_cluster.env)
    real = Path(env["GRADEFLOW_KAFKA_SASL_PASSWORD_FILE"]).read_text().strip()
    if case == "wrong password":
        wrong = tmp_path / "password"
        wrong.write_text(real[::-1] + "\n")
        env["GRADEFLOW_KAFKA_SASL_PASSWORD_FILE"] = str(wrong)
        secrets = [real, real[::-1]]
        expect = "rejected the credentials of user 'gradeflow' (SCRAM-SHA-512)"
    else:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=someone else", "-keyout", str(tmp_path / "k"), "-out", str(tmp_path / "ca.pem")],
                       check=True, capture_output=True)
        env["GRADEFLOW_KAFKA_SSL_CA_FILE"] = str(tmp_path / "ca.pem")
        secrets = [real]
        expect = "the broker certificate is not trusted by CA file"
    for command in (["worker"], ["topics", "check"]):
        proc = run_cli(env, *command)
        assert proc.returncode != 0
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, proc.stdout + proc.stderr
        assert expect in lines[0] and f"127.0.0.1:{PORT}" in lines[0]
        assert not any(secret in lines[0] for secret in secrets)
