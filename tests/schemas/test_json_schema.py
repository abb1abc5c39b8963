"""The committed JSON Schema files equal what the models generate, and real outputs validate against them."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rules.changes import Cause, decide_changes
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load
from rules.state import CustomerState, apply_transaction
from rules import windows
from schemas import generate
from schemas.events import ALL_MODELS


def test_every_model_has_a_file_equal_to_what_generate_writes() -> None:
    files = sorted(p.name for p in generate.JSON_DIR.glob("*.schema.json"))
    assert files == sorted(f"{name}.schema.json" for name in ALL_MODELS)
    for name in ALL_MODELS:
        on_disk = (generate.JSON_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
        assert on_disk == generate.render(name), f"schemas/json/{name}.schema.json is stale: python -m schemas.generate"
        doc = json.loads(on_disk)
        assert doc["$id"] == f"https://gradeflow.dev/schemas/{name}/v1.json"
        assert doc["title"]
        assert on_disk.endswith("}\n") and list(doc) == sorted(doc)
    assert generate.stale_files() == []


def test_check_names_stale_and_missing_files(tmp_path: Path, capsys) -> None:
    assert generate.main(["--dir", str(tmp_path)]) == 0
    assert generate.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "alert.schema.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "dead-letter.schema.json").unlink()
    capsys.readouterr()
    assert generate.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "alert.schema.json" in err and "dead-letter.schema.json" in err
    assert "transaction.schema.json" not in err


def _sample_change_and_alert() -> tuple[dict, dict]:
    rs = compile_ruleset(load("rfm-5"))
    state = CustomerState()
    moment = datetime.fromisoformat("2025-06-01T10:00:00+08:00")
    apply_transaction(state, moment.timestamp(), windows.local_day(moment, rs.tz), False, 1_000_00)
    ev = evaluate(rs, state, moment)
    assert ev.grades["value"] == "B"  # R=5 (0 days), F=1 (1 purchase), M=2 (1000.00): 8
    changes, alerts = decide_changes("c-1", rs, {"value": "A"}, ev, moment, Cause("transaction", "t-1"),
                                     datetime(2025, 6, 1, 2, 0, 1, tzinfo=timezone.utc))
    return changes[0], alerts[0]


def test_outputs_validate_against_the_schema_files() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    change, alert = _sample_change_and_alert()
    for name, doc in (("grade-change", change), ("alert", alert)):
        schema = json.loads((generate.JSON_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        wire = json.loads(json.dumps(doc))
        assert list(validator.iter_errors(wire)) == []
        # And the schema is not vacuous: breaking the contract is caught.
        assert list(validator.iter_errors({**wire, "unexpected": 1}))
        assert list(validator.iter_errors({k: v for k, v in wire.items() if k != "customer_id"}))


def test_input_schemas_accept_valid_and_refuse_invalid_events() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((generate.JSON_DIR / "transaction.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    good = {"event_id": "t-1", "customer_id": "c-1", "occurred_at": "2025-01-01T23:30:00+08:00", "type": "purchase",
            "amount": "12.50", "currency": "CNY", "extra": True}
    assert list(validator.iter_errors(good)) == []
    for bad in ({**good, "occurred_at": "2025-01-01T23:30:00"}, {**good, "amount": "-1"}, {**good, "amount": 0},
                {**good, "currency": "XYZ"}, {**good, "type": "sale"}, {**good, "occurred_at": 1735745400}):
        assert list(validator.iter_errors(bad)), bad
