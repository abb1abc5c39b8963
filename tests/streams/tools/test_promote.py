"""``gradeflow rules promote`` and ``rollback`` against the broker, without workers
(streams/tools/promote.py): what each writes on the rules-control topic and what each refuses."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from rules.ruleset import PRESETS_DIR
from streams.rules_control import ControlError, read_control
from streams.settings import Settings, load_settings
from streams.tools.local import drop_run, unique_env
from streams.tools.promote import promote, rollback, wait
from streams.topics import create_topics

V1 = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")
V2 = V1.replace('version: "1"', 'version: "2"').replace("{min: 10, grade: A}", "{min: 11, grade: A}")


@pytest.fixture
def app(bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    env = unique_env("promote")
    (tmp_path / "v1.yaml").write_text(V1, encoding="utf-8")
    settings = load_settings(kafka_bootstrap=bootstrap, ruleset=str(tmp_path / "v1.yaml"),
                             **{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()
                                if k.startswith("GRADEFLOW_TOPIC_") or k == "GRADEFLOW_APP_ID"})
    create_topics(settings)
    yield settings
    drop_run(bootstrap, env)


def test_promote_and_rollback_write_versioned_records_and_refuse_what_would_mislead(app: Settings,
                                                                                    tmp_path: Path) -> None:
    out = io.StringIO()
    with pytest.raises(ControlError, match="nothing to roll back"):
        rollback(app, out)
    assert promote(app, str(tmp_path / "v1.yaml"), out) is None  # what the workers run already
    assert "rfm-5@1 is active already (GRADEFLOW_RULESET" in out.getvalue()
    assert read_control(app)[0] is None

    (tmp_path / "v2.yaml").write_text(V2, encoding="utf-8")
    record = promote(app, str(tmp_path / "v2.yaml"), out)
    assert record is not None and "promoted rfm-5@2 (rules-control v1, previous rfm-5@1)" in out.getvalue()
    current, _ = read_control(app)
    assert current == record and current.previous_document == V1 and current.document == V2
    assert promote(app, str(tmp_path / "v2.yaml"), out) is None
    # The same id@version with another document would leave customers graded by the first unnoticed.
    (tmp_path / "v2-other.yaml").write_text(V2.replace("{min: 13, grade: S}", "{min: 14, grade: S}"), encoding="utf-8")
    with pytest.raises(ControlError, match="rfm-5@2 is active with another document"):
        promote(app, str(tmp_path / "v2-other.yaml"), out)

    back = rollback(app, out)
    assert (back.control_version, back.action, back.ruleset.version, back.document) == (2, "rollback", "1", V1)
    assert back.previous is not None and back.previous.version == "2" and back.previous_document == V2
    assert read_control(app)[0] == back
    # A rollback of the rollback promotes v2 again, under a new control version and promotion id.
    again = rollback(app, out)
    assert (again.control_version, again.ruleset.version) == (3, "2")
    assert again.promotion_id != record.promotion_id


def test_nothing_is_written_without_the_control_topic(bootstrap: str, tmp_path: Path) -> None:
    env = unique_env("promote")
    settings = load_settings(kafka_bootstrap=bootstrap, app_id=env["GRADEFLOW_APP_ID"])
    (tmp_path / "v2.yaml").write_text(V2, encoding="utf-8")
    try:
        with pytest.raises(ControlError, match=f"{env['GRADEFLOW_APP_ID']}-rules-control: missing"):
            promote(settings, str(tmp_path / "v2.yaml"), io.StringIO())
    finally:
        assert drop_run(bootstrap, env) == []  # and the command created no topic


def test_wait_gives_up_after_its_timeout_when_no_worker_reports(app: Settings, tmp_path: Path) -> None:
    (tmp_path / "v2.yaml").write_text(V2, encoding="utf-8")
    record = promote(app, str(tmp_path / "v2.yaml"), io.StringIO())
    assert record is not None
    err = io.StringIO()
    assert wait(app, record, timeout_s=1.5, out=err, poll_s=0.2) is False
    assert "re-grading for rfm-5@2" in err.getvalue() and "0/4" in err.getvalue()
