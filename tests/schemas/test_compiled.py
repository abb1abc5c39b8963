"""The compiled hot path (schemas/compiled.py) computes exactly what the sources compute.

Each side runs in a child interpreter: the checkout as it is (compiled when ``make compile`` built
it from these sources) and a copy of the packages without the build (plain Python). Both grade
one corpus (purchases, refunds, balances, invoices, interactions with attributes, bad records)
under presets that use every part of the state, and print a hash of every output and state.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas import compiled
from schemas.events import INTERACTION_TYPES

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["rfm-5", "annual-sales-vip", "bank-tiers", "credit-days", "education-sadc", "sales-cycle-abcde",
           "b2b-pipeline-abcd", "loyalty", "risk-3"]

_GRADE_ALL = textwrap.dedent("""
    import hashlib, json, sys
    from datetime import datetime
    from schemas import compiled
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.processor import Record, process_batch
    import rules.engine
    records = [Record(r[0], r[1], r[2], r[3], r[4].encode(), None if r[5] is None else r[5].encode())
               for r in json.load(open(sys.argv[1]))]
    now = datetime.fromisoformat("2026-06-01T00:00:00+00:00")
    out = {"status": compiled.status(), "engine": rules.engine.__file__}
    for preset in sys.argv[2:]:
        rs = compile_ruleset(load(preset))
        digest, states, counts = hashlib.sha256(), {}, [0, 0, 0]
        for i in range(0, len(records), 300):
            result = process_batch(records[i:i + 300], rs, states, now, clock_horizon=None)
            for key, value in result.dead_letters + result.grade_changes + result.alerts:
                digest.update(repr((key, value)).encode())
            for customer_id, (raw, _) in sorted(result.states.items()):
                states[customer_id] = raw
                digest.update(customer_id.encode() + raw)
            counts[0] += len(result.grade_changes); counts[1] += len(result.alerts); counts[2] += len(result.dead_letters)
        out[preset] = [digest.hexdigest(), *counts]
    print(json.dumps(out))
""")


def _corpus(n: int = 4000, customers: int = 150) -> list[list]:
    rng = random.Random(7)
    start = datetime(2025, 6, 1, tzinfo=timezone.utc)
    kinds = ["purchase"] * 6 + ["refund", "deposit", "withdrawal", "invoice", "payment"]
    rows: list[list] = []
    for i in range(n):
        cid = f"k{rng.randrange(customers):04d}"
        at = (start + timedelta(seconds=i * 7000 + rng.randrange(-90000, 3000))).isoformat()
        if rng.random() < 0.3:
            doc: dict = {"event_id": f"i{i}", "customer_id": cid, "occurred_at": at,
                         "type": rng.choice(sorted(INTERACTION_TYPES))}
            if rng.random() < 0.5:
                doc["attributes"] = {"stage": rng.choice(["lead", "trial", "won"]), "score": rng.randrange(100),
                                     "expected_close": (start + timedelta(days=rng.randrange(400))).date().isoformat(),
                                     "intent": rng.choice(["high", "low", "12%", True])}
            role, topic = "i", "interactions"
        else:
            kind = rng.choice(kinds)
            doc = {"event_id": f"t{i if rng.random() > 0.02 else i - 1}", "customer_id": cid, "occurred_at": at,
                   "type": kind, "amount": f"{rng.randint(1, 90000)}.{rng.randint(0, 99):02d}",
                   "currency": "CNY" if rng.random() > 0.01 else "USD"}
            if kind in ("invoice", "payment"):
                doc["invoice_id"] = f"v{rng.randrange(n // 5)}"
            role, topic = "t", "transactions"
        value = json.dumps(doc)
        if rng.random() < 0.01:
            value = value[:-3]  # malformed
        rows.append([role, topic, 0, i, cid, value])
    return rows


def _grade(tree: Path, corpus: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _GRADE_ALL, str(corpus), *PRESETS], cwd=tree,
                          capture_output=True, text=True, timeout=240, env={"PYTHONPATH": str(tree), "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(compiled.status() != "compiled",
                    reason="the hot path is not compiled from these sources (make compile)")
def test_compiled_and_plain_python_give_the_same_outputs_and_states(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(_corpus()))
    plain = tmp_path / "plain"
    for package in ("rules", "schemas", "streams"):
        shutil.copytree(ROOT / package, plain / package, ignore=shutil.ignore_patterns("__pycache__"))
    fast, slow = _grade(ROOT, corpus), _grade(plain, corpus)
    assert fast.pop("status") == "compiled" and fast.pop("engine").endswith(".so")
    assert slow.pop("status") == "absent" and slow.pop("engine").endswith("engine.py")
    assert fast == slow
    # the corpus exercises what it should: changes, alerts and dead letters under several presets
    assert all(changes > 0 for _, changes, _, _ in fast.values())
    assert sum(alerts for _, _, alerts, _ in fast.values()) > 0
    assert all(dead > 0 for _, _, _, dead in fast.values())


def test_a_build_from_other_sources_is_not_used(tmp_path: Path) -> None:
    """An edited source runs as written: a build whose stamp is not the sources' hash is ignored."""
    tree = tmp_path / "tree"
    for package in ("rules", "schemas", "streams"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    if compiled.status() == "compiled":
        shutil.copytree(compiled.BUILD, tree / ".build" / "mypyc")
    else:  # no build here: an empty one with a stamp still shows the check
        (tree / ".build" / "mypyc" / "rules").mkdir(parents=True)
        (tree / ".build" / "mypyc" / "stamp").write_text(compiled.source_stamp() + "\n")
    code = "from schemas import compiled; import rules.engine; print(compiled.status(), rules.engine.__file__)"
    env = {"PYTHONPATH": str(tree), "PATH": ""}
    before = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, env=env)
    assert before.stdout.split()[0] == "compiled", before.stderr
    engine = tree / "rules" / "engine.py"
    engine.write_text(engine.read_text() + "\n# edited\n")
    after = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, env=env)
    assert after.stdout.split() == ["stale", str(engine)], after.stderr
