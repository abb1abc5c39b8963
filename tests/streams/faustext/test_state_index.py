"""streams/faustext/state_index.py: the memory store's state index holds what a plain dict would
under any mix of batch and single operations, and says which keys a batch write added."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.faustext.state_index import StateIndex


KEYS = st.sampled_from([f"k{i}".encode() for i in range(60)])
BATCH = st.lists(KEYS, max_size=30)
OPS = st.lists(st.one_of(
    st.tuples(st.just("set_many"), BATCH),
    st.tuples(st.just("get_many"), BATCH),
    st.tuples(st.just("delete_many"), BATCH),
    st.tuples(st.just("set"), KEYS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("pop"), KEYS),
    st.tuples(st.just("update"), BATCH),
    st.tuples(st.just("clear"), st.just(b"")),
), max_size=80)


def _check(ops: list, index: Any) -> None:
    model: dict[bytes, object] = {}
    for step, (op, arg) in enumerate(ops):
        if op == "set_many":
            keys = [bytes(bytearray(k)) for k in arg]  # equal keys, other objects, as the worker makes them
            values = [(step, i) for i in range(len(keys))]
            new = index.set_many(keys, values)
            firsts = list({k: i for i, k in reversed(list(enumerate(keys)))}.items())
            assert new == sorted(i for k, i in firsts if k not in model)
            model.update(zip(keys, values))
        elif op == "get_many":
            assert index.get_many(arg) == [model.get(k) for k in arg]
        elif op == "delete_many":
            assert index.delete_many(arg) == len(set(arg) & set(model))
            for k in arg:
                model.pop(k, None)
        elif op == "set":
            index[arg] = step
            model[arg] = step
        elif op == "delete":
            if arg in model:
                del index[arg]
                del model[arg]
            else:
                with pytest.raises(KeyError):
                    del index[arg]
        elif op == "pop":
            assert index.pop(arg, "none") == model.pop(arg, "none")
        elif op == "update":
            pairs = [(k, (step, "u", i)) for i, k in enumerate(arg)]
            index.update(iter(pairs))
            model.update(pairs)
        else:
            index.clear()
            model.clear()
        assert len(index) == len(model)
    assert dict(index.items()) == model
    assert sorted(index) == sorted(model) == sorted(index.keys())
    assert sorted(map(repr, index.values())) == sorted(map(repr, model.values()))
    assert all(index.get(k) == v and index[k] == v and k in index for k, v in model.items())
    assert all(index.get(k) is None and k not in index for k in (b"absent", b"k99"))



@settings(max_examples=200, deadline=None)
@given(OPS)
def test_the_state_index_holds_what_a_dict_would(ops: list) -> None:
    _check(ops, StateIndex())


def test_it_is_a_mutable_mapping_built_from_another() -> None:
    index = StateIndex({b"y": 2})
    assert isinstance(index, MutableMapping) and index == {b"y": 2}
    assert index.setdefault(b"z", 3) == 3 and index.get_many([b"z", b"y", b"q"]) == [3, 2, None]


def test_bad_batch_arguments_are_refused_with_what_is_wrong() -> None:
    index = StateIndex()
    with pytest.raises(TypeError, match="keys are bytes, not str"):
        index.set_many(["a"], [1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="keys are bytes, not bytearray"):
        index.set_many([bytearray(b"a")], [1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 keys for 1 values"):
        index.set_many([b"a", b"b"], [1])
    assert len(index) == 0
