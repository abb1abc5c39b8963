"""streams.tools.local.drop_run: a measured or tested run leaves no topics and no data behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from streams.tools.local import drop_run, kafka_options, unique_env


def _topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(**kafka_options(bootstrap))
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_drop_run_deletes_the_runs_topics_and_data_and_nothing_else(bootstrap: str, tmp_path: Path) -> None:
    env = unique_env("droptest", GRADEFLOW_DATA_DIR=str(tmp_path / "data"))
    other = unique_env("droptest")
    tag = env["GRADEFLOW_APP_ID"]
    mine = [env["GRADEFLOW_TOPIC_TRANSACTIONS"], f"{tag}-customer-state-changelog", f"{tag}-__assignor-__leader"]
    # A topic whose name only starts like the tag (no dash after it) is another run's.
    theirs = [other["GRADEFLOW_TOPIC_TRANSACTIONS"], f"{tag}x"]
    admin = KafkaAdminClient(**kafka_options(bootstrap))
    try:
        admin.create_topics([NewTopic(name, 1, 1) for name in mine + theirs])
    finally:
        admin.close()
    (tmp_path / "data" / "tables").mkdir(parents=True)
    (tmp_path / "data" / "tables" / "state").write_bytes(b"x")

    assert set(drop_run(bootstrap, env)) == set(mine)

    left = _topics(bootstrap)
    assert not set(mine) & left
    assert set(theirs) <= left
    assert not (tmp_path / "data").exists()
    drop_run(bootstrap, other)
    admin = KafkaAdminClient(**kafka_options(bootstrap))
    try:
        admin.delete_topics([f"{tag}x"])
    finally:
        admin.close()


@pytest.mark.parametrize("app_id", ["gradeflow", "demo", "bench-1234567", "bench-zzzzzzzz", ""])
def test_drop_run_refuses_an_app_id_not_made_by_unique_env(app_id: str) -> None:
    # No broker is needed: the refusal comes before any connection.
    with pytest.raises(ValueError, match="not an app id made by unique_env"):
        drop_run("127.0.0.1:1", {"GRADEFLOW_APP_ID": app_id})
