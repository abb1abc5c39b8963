"""streams/faustext/state_index.py: the memory store's state index behaves as a dict under any mix of batch
and single operations, in C (streams/_statetable.c, built here from the current source when
``make compile`` has not) and on a dict; the C table also with keys whose fingerprints collide,
across growth, tombstones and shrinking, and releasing every value it drops."""

from __future__ import annotations

import gc
import importlib.util
import shutil
import sys
import sysconfig
import weakref
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.faustext.state_index as state_index
from schemas.compiled import EXTENSIONS, ROOT
from streams.faustext.state_index import DictStateIndex


@pytest.fixture(scope="session")
def table_type(tmp_path_factory: pytest.TempPathFactory) -> type:
    """The compiled StateTable: the build's when current, else compiled here from the source."""
    if state_index.COMPILED:
        return state_index.StateTable
    from setuptools import Extension, setup

    work = tmp_path_factory.mktemp("statetable")
    source = ROOT / EXTENSIONS["streams._statetable"]
    shutil.copy(source, work / source.name)
    setup(name="statetable-test", ext_modules=[Extension("_statetable", [str(work / source.name)])],
          script_args=["-q", "build_ext", "--build-lib", str(work), "--build-temp", str(work / "o")])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    spec = importlib.util.spec_from_file_location("_statetable", work / f"_statetable{suffix}")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StateTable


@pytest.fixture(scope="session")
def compiled(table_type: type) -> type:
    class Index(table_type, MutableMapping):  # type: ignore[misc,valid-type]
        __slots__ = ()

    return Index


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
        if hasattr(index, "capacity"):
            assert 3 * index.used <= 2 * index.capacity
    assert dict(index.items()) == model
    assert sorted(index) == sorted(model) == sorted(index.keys())
    assert sorted(map(repr, index.values())) == sorted(map(repr, model.values()))
    assert all(index.get(k) == v and index[k] == v and k in index for k, v in model.items())
    assert all(index.get(k) is None and k not in index for k in (b"absent", b"k99"))


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_the_compiled_table_holds_what_a_dict_would(compiled: type, ops: list) -> None:
    _check(ops, compiled())


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_keys_whose_fingerprints_collide_are_told_apart(compiled: type, ops: list) -> None:
    # Two bits of fingerprint for sixty keys: long probe runs, every fingerprint match checked against the key.
    _check(ops, compiled(fingerprint_bits=2))


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_the_dict_fallback_holds_what_a_dict_would(ops: list) -> None:
    _check(ops, DictStateIndex())


def test_the_worker_uses_the_compiled_table_when_the_build_is_current() -> None:
    from schemas import compiled

    assert state_index.COMPILED == (compiled.status() == "compiled")
    assert (state_index.StateIndex is DictStateIndex) != state_index.COMPILED
    assert isinstance(state_index.StateIndex(), MutableMapping)


def test_many_keys_grow_the_table_and_deleting_most_of_them_shrinks_it(compiled: type) -> None:
    index = compiled()
    keys = [f"c{i:07d}".encode() for i in range(100_000)]
    for start in range(0, len(keys), 2_000):
        index.set_many(keys[start:start + 2_000], keys[start:start + 2_000])
    assert len(index) == 100_000 and 2 * 100_000 <= index.capacity <= 4 * 100_000
    assert index.get_many(keys[::997]) == keys[::997]
    assert index.delete_many(keys[1_000:]) == 99_000
    assert len(index) == 1_000 and index.capacity <= 4_096 and index.used == 1_000  # tombstones dropped
    assert index.get_many(keys[:1_000]) == keys[:1_000] and index.get_many(keys[1_000:1_010]) == [None] * 10


def test_every_value_dropped_is_released(compiled: type) -> None:
    class Value:
        pass

    index = compiled()
    olds = [Value() for _ in range(50)]
    refs = [weakref.ref(v) for v in olds]
    index.set_many([f"k{i}".encode() for i in range(50)], olds)
    del olds
    assert all(r() is not None for r in refs)
    index.set_many([f"k{i}".encode() for i in range(25)], [Value() for _ in range(25)])  # replaced
    index.delete_many([f"k{i}".encode() for i in range(25, 35)])  # deleted
    assert [r() is None for r in refs] == [True] * 35 + [False] * 15
    index[b"k40"] = 1
    del index[b"k41"]
    assert refs[40]() is None and refs[41]() is None
    kept = [weakref.ref(v) for v in index.values() if isinstance(v, Value)]
    index.clear()
    assert len(index) == 0 and all(r() is None for r in kept + refs)


def test_keys_and_values_are_not_leaked_by_a_batch_read_or_write(compiled: type) -> None:
    index = compiled()
    key, value = b"k-" + bytes(20), b"v-" + bytes(400)
    index.set_many([key], [value])
    before = sys.getrefcount(key), sys.getrefcount(value)
    for _ in range(100):
        index.get_many([key, b"absent"])
        index.set_many([key, b"new"], [value, value])
        index.delete_many([b"new"])
    assert (sys.getrefcount(key), sys.getrefcount(value)) == before


def test_a_value_released_by_a_write_may_change_the_table(compiled: type) -> None:
    index = compiled()

    class Rewrites:
        def __del__(self) -> None:  # runs when the table lets go of it: the table must be whole by then
            index[b"from-del"] = len(index)
            index.delete_many([b"victim"])

    index.set_many([b"a", b"victim"], [Rewrites(), 1])
    index.set_many([b"a", b"b"], [2, 3])
    assert dict(index.items()) == {b"a": 2, b"b": 3, b"from-del": 3}


def test_a_cycle_through_the_table_is_collected(compiled: type) -> None:
    class Holder:
        pass

    index = compiled()
    holder = Holder()
    holder.index = index  # type: ignore[attr-defined]
    index[b"h"] = holder
    ref = weakref.ref(holder)  # held only by the table, which only the holder holds
    del index, holder
    gc.collect()
    assert ref() is None


def test_bad_arguments_are_refused_with_what_is_wrong(compiled: type) -> None:
    index = compiled()
    with pytest.raises(TypeError, match="keys are bytes, not str"):
        index.set_many(["a"], [1])
    with pytest.raises(TypeError, match="keys are bytes, not bytearray"):
        index.get_many([bytearray(b"a")])
    with pytest.raises(TypeError, match="keys are bytes, not int"):
        index[1] = 2
    with pytest.raises(ValueError, match="2 keys for 1 values"):
        index.set_many([b"a", b"b"], [1])
    with pytest.raises(TypeError, match="keyword"):
        index.update(a=1)
    with pytest.raises(ValueError, match="fingerprint_bits"):
        compiled(fingerprint_bits=0)
    assert len(index) == 0 and index.get("a") is None and "a" not in index
    index.update({b"x": 1}, )
    assert compiled({b"y": 2}) == {b"y": 2} and index == {b"x": 1}


def test_the_c_source_is_shipped_with_the_package() -> None:
    # deploy/compile.py compiles an installed package in place (the Dockerfile does): the source must be in it.
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    source = Path(EXTENSIONS["streams._statetable"])
    assert source.name in data[source.parent.name] and (ROOT / source).is_file()
