"""streams/state_index.py: the memory store's index behaves as a dict under any mix of batch and
single operations, including keys that share a hash and writes across a rebuild or a deletion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.state_index as state_index
from streams.state_index import StateIndex

KEYS = st.sampled_from([f"k{i}".encode() for i in range(60)])
BATCH = st.lists(KEYS, max_size=25)
OPS = st.lists(st.one_of(
    st.tuples(st.just("set_many"), BATCH),
    st.tuples(st.just("read_write"), st.lists(KEYS, max_size=25, unique=True)),  # a batch's read, then its write-back
    st.tuples(st.just("read_delete_write"), st.lists(KEYS, min_size=1, max_size=25, unique=True)),
    st.tuples(st.just("delete_many"), BATCH),
    st.tuples(st.just("set"), KEYS),
    st.tuples(st.just("delete"), KEYS),
), max_size=60)


def _check(ops: list, index: StateIndex) -> None:
    model: dict[bytes, object] = {}
    for step, (op, arg) in enumerate(ops):
        if op == "set_many":
            values = [(step, i) for i in range(len(arg))]
            new = index.set_many(arg, values)
            assert sorted({arg[i] for i in new}) == sorted({k for k in arg if k not in model})
            assert len(new) == len(set(arg) - set(model))
            model.update(zip(arg, values))
        elif op in ("read_write", "read_delete_write"):
            assert index.get_many(arg) == [model.get(k) for k in arg]
            if op == "read_delete_write":  # a rebalance drops a key between a batch's read and its write
                index.delete_many([arg[0]])
                model.pop(arg[0], None)
            keys = [bytes(k) for k in arg]  # equal keys, other objects, as the worker makes them
            values = [(step, "w", i) for i in range(len(keys))]
            new = index.set_many(keys, values, distinct=True)
            assert sorted(keys[i] for i in new) == sorted(k for k in keys if k not in model)
            model.update(zip(keys, values))
        elif op == "delete_many":
            assert index.delete_many(arg) == len(set(arg) & set(model))
            for k in arg:
                model.pop(k, None)
        elif op == "set":
            index[arg] = step
            model[arg] = step
        else:
            if arg in model:
                del index[arg]
                del model[arg]
            else:
                with pytest.raises(KeyError):
                    del index[arg]
        assert len(index) == len(model)
        assert index.used <= index.capacity // 2 or len(model) == 0
    assert dict(index.items()) == model
    assert sorted(index) == sorted(model)
    assert all(index.get(k) == v and index[k] == v and k in index for k, v in model.items())
    assert all(index.get(k) is None and k not in index for k in (b"absent", b"k99"))


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_it_holds_what_a_dict_would(ops: list) -> None:
    _check(ops, StateIndex())


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_keys_that_share_a_hash_are_told_apart(ops: list) -> None:
    # Four hashes for sixty keys: long probe runs, every match on a hash checked against the key.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(state_index, "_fingerprint", lambda key: len(key) % 4 + 1)
        patch.setattr(state_index, "_fingerprints",
                      lambda keys: state_index.np.array([len(k) % 4 + 1 for k in keys], state_index.np.int64))
        _check(ops, StateIndex())


def test_a_write_back_after_the_table_grew_goes_to_the_moved_keys() -> None:
    index = StateIndex({b"a": 1, b"b": 2})
    assert index.get_many([b"a", b"b", b"new"]) == [1, 2, None]
    before = index.capacity
    index.set_many([f"x{i}".encode() for i in range(100)], list(range(100)))  # a rebuild: keys move
    assert index.capacity > before
    assert index.set_many([b"a", b"b", b"new"], [10, 20, 30]) == [2]
    assert index.get_many([b"a", b"b", b"new", b"x7"]) == [10, 20, 30, 7]


def test_a_write_of_other_keys_than_the_read_looks_them_up() -> None:
    index = StateIndex({b"a": 1, b"b": 2, b"c": 3})
    index.get_many([b"a", b"b", b"c"])
    assert index.set_many([b"c", b"b", b"a"], [30, 20, 10]) == []  # same keys, another order
    index.get_many([b"a", b"b"])
    assert index.set_many([b"b", b"d"], [200, 4]) == [1]
    assert dict(index.items()) == {b"a": 10, b"b": 200, b"c": 30, b"d": 4}


def test_a_key_added_between_a_read_and_its_write_back_is_not_placed_twice() -> None:
    index = StateIndex({b"a": 1})
    index.get_many([b"a", b"b"])
    index[b"b"] = "from the clock"
    assert index.set_many([b"a", b"b"], [10, 20]) == []
    assert len(index) == 2 and dict(index.items()) == {b"a": 10, b"b": 20}


def test_tombstones_are_dropped_and_the_table_stays_at_most_half_used() -> None:
    index = StateIndex({f"k{i}".encode(): i for i in range(1000)})
    capacity = index.capacity
    for round_ in range(5):
        index.delete_many([f"k{i}".encode() for i in range(1000)])
        assert len(index) == 0 and index.used <= index.capacity // 2
        index.set_many([f"k{i}".encode() for i in range(1000)], [round_] * 1000)
    assert index.capacity == capacity and index.get_many([b"k999"]) == [4]


def test_update_takes_the_last_value_of_a_repeated_key_as_a_dict_does() -> None:
    index = StateIndex()
    index.update([(b"a", 1), (b"b", 2), (b"a", 3)])
    assert dict(index.items()) == {b"a": 3, b"b": 2}
    with pytest.raises(TypeError):
        index.update(a=1)
