"""The table of every GRADEFLOW_ variable in docs/deploy.md, generated from streams.settings.

    python deploy/settings_table.py            # print the table
    python deploy/settings_table.py --write    # refresh it in docs/deploy.md (between the markers)

tests/deploy/test_packaging.py fails when a setting is missing from the docs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.settings import Settings  # noqa: E402

DOC = ROOT / "docs" / "deploy.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"

GROUPS = [
    ("Kafka connection", lambda n: n.startswith("kafka_") or n == "topic_prefix"),
    ("Topics", lambda n: n.startswith("topic_") or n in (
        "partitions", "replication_factor", "min_insync_replicas", "create_topics", "grade_changes_cleanup_policy")
        or n.endswith("_retention_ms")),
    ("Downstream: Redis, HTTP API, alerts (docs/downstream.md)", lambda n: n.startswith(("redis", "alert", "api_"))
        or n == "downstream"),
    ("Worker", lambda n: True),
]


# Settings declared without a description.
FALLBACK = {
    "topic_transactions": "Input topic of transactions (GRADEFLOW_TOPIC_PREFIX is prepended).",
    "topic_interactions": "Input topic of interactions (prefix prepended).",
    "topic_grade_changes": "Output topic of grade-change events (prefix prepended).",
    "topic_alerts": "Output topic of key-customer alerts (prefix prepended).",
    "topic_dead_letters": "Output topic of events that could not be applied (prefix prepended).",
    "log_level": "Worker log level: debug, info, warning, error.",
}


def _default(field) -> str:  # noqa: ANN001
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "unset"
    if value == "":
        return '""'
    text = str(value)
    if isinstance(value, (dict, list)):
        import json

        text = json.dumps(value, separators=(",", ":"))
    return f"`{text}`"


def table() -> str:
    rows: dict[str, list[str]] = {title: [] for title, _ in GROUPS}
    for name, field in Settings.model_fields.items():
        title = next(t for t, match in GROUPS if match(name))
        meaning = (field.description or FALLBACK.get(name, "")).replace("|", "\\|")
        rows[title].append(f"| `GRADEFLOW_{name.upper()}` | {_default(field)} | {meaning} |")
    out = []
    for title, lines in rows.items():
        if lines:
            out += [f"**{title}**", "", "| variable | default | meaning |", "|---|---|---|", *lines, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = table()
    if "--write" not in argv:
        print(text, end="")
        return 0
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
