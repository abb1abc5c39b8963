"""bench/dictcost.py: it times lookups and writes of the states it says, scattered as a long run leaves them."""

from __future__ import annotations

import pytest

from bench.dictcost import STATE_BYTES, access_cost, main, scattered_store


def test_the_store_holds_every_customer_with_a_replaced_state_of_a_states_size() -> None:
    store = scattered_store(500, rounds=2)
    assert len(store) == 500
    assert {len(v) for v in store.values()} == {STATE_BYTES}
    # Every state was replaced by the last round, not left from the first fill.
    assert {v[-8:] for v in store.values()} == {(1).to_bytes(8, "little")}


def test_the_access_writes_new_states_for_existing_customers_only() -> None:
    store = scattered_store(300, rounds=1)
    before = dict(store)
    read, write = access_cost(store, batches=2)
    assert read > 0 and write > 0
    assert store.keys() == before.keys()  # no customer added
    changed = sum(store[k] != before[k] for k in store)
    # The second batch's BATCH writes over 300 customers touch nearly all of them (its value ends in 1;
    # a customer written only by the first batch got back the value it had).
    assert changed > 250 and all(v[-8:] == (1).to_bytes(8, "little") for k, v in store.items() if v != before[k])


def test_the_table_has_a_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sizes", "100,1000", "--batches", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1")]
    assert [r.split("|")[1].strip() for r in rows] == ["100", "1,000"]
    assert all(float(cell) > 0 for r in rows for cell in r.split("|")[2:5])
