"""bench/indexcost.py: its array index reads and writes what a dict would, and the table compares the two."""

from __future__ import annotations

import pytest

from bench.dictcost import scattered_store
from bench.indexcost import ArrayIndex, compare, main


def test_a_batch_read_gives_each_keys_value_and_none_for_an_absent_key() -> None:
    store = scattered_store(2_000, rounds=1)
    index = ArrayIndex(store)
    keys = [*list(store)[::7], b"nobody", b"c9999999"]
    assert index.get_many(keys) == [store.get(k) for k in keys]
    assert index.get_many(keys)[-2:] == [None, None]


def test_a_key_is_compared_not_only_its_hash() -> None:
    index = ArrayIndex({b"alice": b"1", b"bob": b"2"})
    slot = int(index.positions([b"alice"])[0])
    # Another key in alice's slot, with alice's hash left there: a hash shared by two keys.
    index.keys[slot] = b"mallory"
    assert index.get_many([b"alice", b"bob"]) == [None, b"2"]


def test_a_batch_write_replaces_values_of_present_keys_and_refuses_an_absent_one() -> None:
    index = ArrayIndex({b"a": b"1", b"b": b"2", b"c": b"3"})
    index.set_many([b"c", b"a"], [b"33", b"11"])
    assert index.get_many([b"a", b"b", b"c"]) == [b"11", b"2", b"33"]
    with pytest.raises(KeyError):
        index.set_many([b"a", b"zzz"], [b"1", b"2"])


def test_the_comparison_times_each_structure_on_reads_it_checked_equal(capsys: pytest.CaptureFixture[str]) -> None:
    ns = compare(500, batches=2)
    expected = {"dict read", "dict write", "index read", "index write"}
    assert set(ns) == expected and min(ns.values()) > 0
    assert main(["--sizes", "100,1000", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1")]
    assert [r.split("|")[1].strip() for r in rows] == ["100", "1,000"]
    assert all(len(r.split("|")) == len(expected) + 3 for r in rows)
