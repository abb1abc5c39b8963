"""What ships: the wheel (presets, JSON Schemas, console script), the Dockerfile, the compose
file and the Kubernetes manifests, all checked offline (there is no Docker engine or cluster)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from streams.tools.local import ROOT
from streams.settings import Settings, load_settings

K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
DOCS = ROOT / "docs" / "deploy.md"
SETTINGS_VARS = {f"GRADEFLOW_{name.upper()}" for name in Settings.model_fields}


def manifests() -> list[dict]:
    """Every document under deploy/k8s/, its subdirectories (monitoring/) included."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


# Kinds of the Prometheus Operator (deploy/k8s/monitoring/): not in Kubernetes' own schemas.
OPERATOR_API = "monitoring.coreos.com/v1"


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_kubernetes_manifests_validate_against_the_schemas(version):
    import kubernetes_validate

    kinds = []
    for doc in manifests():
        if doc["apiVersion"] == OPERATOR_API:
            continue  # checked in tests/deploy/test_deploy_security.py
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service",
                             "StatefulSet"]


def test_statefulset_wiring():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    sts = docs[("StatefulSet", "gradeflow")]
    pod = sts["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["resources"]["requests"]["cpu"] and worker["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # RocksDB on a per-pod volume, rules from the ConfigMap, credentials from the Secret.
    [claim] = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    config = docs[("ConfigMap", "gradeflow-config")]["data"]
    assert mounts[claim["metadata"]["name"]] == config["GRADEFLOW_DATA_DIR"]
    assert config["GRADEFLOW_STORE"] == "rocksdb://"
    # The settings a worker would read from it pass validation (a standby needs RocksDB, ...).
    settings = load_settings(**{k.removeprefix("GRADEFLOW_").lower(): v for k, v in config.items()})
    assert settings.standby_replicas == 1 and settings.store == "rocksdb://" and settings.partitions == 12
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == "gradeflow-rules"
    assert config["GRADEFLOW_RULESET"] == mounts["rules"] + "/ruleset.yaml"
    # The Kafka credentials are files of the gradeflow-kafka Secret, created as docs/deploy.md says.
    from test_deploy_security import secrets_created_in_docs

    assert volumes["kafka-credentials"]["secret"]["secretName"] == "gradeflow-kafka"
    for key in ("GRADEFLOW_KAFKA_SASL_PASSWORD_FILE", "GRADEFLOW_KAFKA_SSL_CA_FILE"):
        directory, _, name = config[key].rpartition("/")
        assert directory == mounts["kafka-credentials"] and name in secrets_created_in_docs()["gradeflow-kafka"]
    assert "GRADEFLOW_KAFKA_SASL_PASSWORD" not in config  # the password only as a file
    # Every variable set is one gradeflow reads (no typo is silently ignored).
    env_names = set(config) | {e["name"] for e in worker.get("env", []) if e["name"].startswith("GRADEFLOW_")}
    assert env_names <= SETTINGS_VARS, env_names - SETTINGS_VARS
    pdb = docs[("PodDisruptionBudget", "gradeflow")]
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert int(sts["spec"]["replicas"]) <= int(config["GRADEFLOW_PARTITIONS"])


def test_the_rules_configmap_holds_a_valid_ruleset(tmp_path):
    from rules.ruleset import load

    [rules] = [d for d in manifests() if d["metadata"]["name"] == "gradeflow-rules"]
    path = tmp_path / "ruleset.yaml"
    path.write_text(rules["data"]["ruleset.yaml"])
    assert load(str(path)).id == "rfm-5"


def test_compose_file_names_the_images_and_variables_the_docs_describe():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["redis"]["image"].startswith("redis:")
    workers = [name for name, s in services.items() if s.get("command") == ["worker"]]
    assert sorted(workers) == ["worker-1", "worker-2"]
    assert services["topics"]["command"] == ["topics", "create"]
    docs = DOCS.read_text()
    for name, service in services.items():
        image = service["image"].replace("${GRADEFLOW_IMAGE:-", "").rstrip("}")
        assert image in docs, f"docs/deploy.md does not mention the image {image} of {name}"
    env = services["worker-1"]["environment"]
    assert set(env) <= SETTINGS_VARS, set(env) - SETTINGS_VARS
    for var in env:
        assert var in docs, f"docs/deploy.md does not describe {var}"


def test_docs_table_lists_every_setting():
    docs = DOCS.read_text()
    listed = set(re.findall(r"^\| `(GRADEFLOW_[A-Z0-9_]+)`", docs, flags=re.M))
    assert SETTINGS_VARS <= listed, (f"{sorted(SETTINGS_VARS - listed)} missing from docs/deploy.md: "
                                     f"run `python deploy/settings_table.py --write`")


def test_dockerfile_is_multi_stage_non_root_and_pinned():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["gradeflow"\]', text, flags=re.M)
    assert "/healthz" in text
    assert "deploy/compile.py build" in text  # the image runs the compiled hot path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".local" in ignored and ".git" in ignored


@pytest.mark.slow
def test_built_wheel_installs_a_working_gradeflow(tmp_path):
    """Build the wheel from a clean copy, install it in a fresh venv, run it from elsewhere."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    for name in ("README.md", "LICENSE"):  # pyproject's readme; the licence file setuptools ships
        shutil.copy(ROOT / name, src / name)
    for pkg in ("streams", "schemas", "rules"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=180)
    [wheel] = list((tmp_path / "dist").glob("gradeflow-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies come from this test's environment (no network); gradeflow itself only from the wheel.
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=180)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    version = subprocess.run([str(venv / "bin" / "gradeflow"), "--version"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == "gradeflow 0.1.0", version.stderr
    probe = (
        "import importlib.resources as r, json, rules, schemas, streams\n"
        "from rules.ruleset import load\n"
        "assert str(venv) in streams.__file__, streams.__file__\n"
        "presets = sorted(p.name for p in r.files('rules').joinpath('presets').iterdir())\n"
        "assert 'rfm-5.yaml' in presets\n"
        "for name in presets: load(name[:-5])\n"
        "names = sorted(p.name for p in r.files('schemas').joinpath('json').iterdir())\n"
        "for n in names: json.loads(r.files('schemas').joinpath('json', n).read_text())\n"
        "print(len(presets), names)\n"
    ).replace("str(venv)", repr(str(venv)))
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=elsewhere, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "grade-change.schema.json" in out.stdout and "transaction.schema.json" in out.stdout
    rules_check = subprocess.run([str(venv / "bin" / "gradeflow"), "rules", "check", "rfm-5"], cwd=elsewhere,
                                 capture_output=True, text=True, timeout=60)
    assert rules_check.returncode == 0, rules_check.stderr
    # As the Dockerfile does: the installed package's hot path compiled in place by a second, throwaway
    # venv that holds the compiler and sees the installed package through PYTHONPATH; then used by
    # the package's own venv from anywhere.
    compiler = tmp_path / "compile"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(compiler)], check=True, timeout=60)
    compiler_site = subprocess.run([str(compiler / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    (Path(compiler_site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # mypy, setuptools
    build = subprocess.run([str(compiler / "bin" / "python"), str(ROOT / "deploy" / "compile.py"), "build"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    probe = "from schemas import compiled; import rules.engine; print(compiled.status(), rules.engine.__file__)"
    used = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                          timeout=60)
    assert used.returncode == 0, used.stderr
    state, engine = used.stdout.split()
    assert state == "compiled" and engine.startswith(str(site / ".build" / "mypyc" / "rules")), used.stdout
