"""streams/faustext refuses a faust-streaming or aiokafka release it is not tested with, and says
what it found, what it supports and what to do; ``gradeflow worker`` prints that and exits 1."""

from __future__ import annotations

import importlib.metadata
import tomllib

import pytest

from schemas.errors import ConfigurationError
from streams.faustext import TESTED, UntestedDependency, check_versions, installed_versions
from streams.tools import cli
from streams.tools.local import ROOT


def _fake(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    """Make importlib.metadata report ``versions`` (distribution name with ``_`` for ``-``; None:
    not installed), the real version of any other distribution."""
    real = importlib.metadata.version
    wanted = {name.replace("_", "-"): version for name, version in versions.items()}

    def version(name: str) -> str:
        if name in wanted:
            if wanted[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return str(wanted[name])
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_the_installed_releases_are_the_tested_ones() -> None:
    check_versions()
    found = installed_versions()
    assert found["faust-streaming"] == "0.15.3"
    assert found["aiokafka"] is not None and found["aiokafka"].startswith("0.14.")


@pytest.mark.parametrize(("faust", "aiokafka"), [("0.15.3", "0.14.0"), ("0.15.3", "0.14.7"), ("0.15.3", "0.14.1rc1")])
def test_a_tested_release_is_accepted(monkeypatch: pytest.MonkeyPatch, faust: str, aiokafka: str) -> None:
    _fake(monkeypatch, faust_streaming=faust, aiokafka=aiokafka)
    check_versions()


@pytest.mark.parametrize(("faust", "aiokafka", "wrong"), [
    ("0.16.0", "0.14.0", "faust-streaming 0.16.0"),
    ("0.15.4", "0.14.0", "faust-streaming 0.15.4"),
    ("0.15.2", "0.14.0", "faust-streaming 0.15.2"),
    ("0.15.3", "0.15.0", "aiokafka 0.15.0"),
    ("0.15.3", "0.13.9", "aiokafka 0.13.9"),
    ("0.15.3", "1.0.0", "aiokafka 1.0.0"),
])
def test_another_release_is_refused_naming_found_and_supported(monkeypatch: pytest.MonkeyPatch, faust: str,
                                                                aiokafka: str, wrong: str) -> None:
    _fake(monkeypatch, faust_streaming=faust, aiokafka=aiokafka)
    with pytest.raises(UntestedDependency) as caught:
        check_versions()
    message = str(caught.value)
    assert isinstance(caught.value, ConfigurationError)
    assert wrong in message
    assert f"found faust-streaming {faust}, aiokafka {aiokafka}" in message
    assert "tested only with faust-streaming 0.15.3 and aiokafka 0.14.x" in message
    assert "pip install 'faust-streaming==0.15.3' 'aiokafka>=0.14,<0.15'" in message


def test_a_missing_distribution_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, aiokafka=None)
    with pytest.raises(UntestedDependency, match="aiokafka not installed"):
        check_versions()


def test_the_tested_versions_are_the_ones_pyproject_pins() -> None:
    assert TESTED["faust-streaming"][1] == "0.15.3"
    assert TESTED["aiokafka"][1] == "0.14.x"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "faust-streaming==0.15.3" in requires
    assert "aiokafka>=0.14,<0.15" in requires


def test_the_worker_prints_the_refusal_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _fake(monkeypatch, faust_streaming="0.16.1")
    # A closed port: were the guard to let the worker through, it would fail on the broker instead.
    assert cli.main(["worker", "--bootstrap", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gradeflow: found faust-streaming 0.16.1, aiokafka ")
    assert "tested only with faust-streaming 0.15.3 and aiokafka 0.14.x" in err
    assert "topic check" not in err and "READY" not in err
