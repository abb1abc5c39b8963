"""streams/memory.py: the worker's malloc settings (arena cap, mmap threshold) and collector threshold."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streams.memory import limit_malloc_arenas
from streams.settings import Settings


def _run_in_a_child(code: str) -> None:
    """Run ``code`` in a fresh interpreter (the settings under test are process-wide); it prints "ok"."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_zero_leaves_the_allocator_alone() -> None:
    assert limit_malloc_arenas(0) is False


def test_the_cap_applies_on_glibc_and_threads_still_allocate() -> None:
    # In a child: the cap is process-wide and this test process has threads already.
    code = textwrap.dedent("""
        import platform, threading
        from streams.memory import limit_malloc_arenas
        applied = limit_malloc_arenas(2)
        assert applied == (platform.libc_ver()[0] == "glibc"), applied
        out = []
        def work():
            out.append(sum(len(bytes(1000)) for _ in range(10000)))
        threads = [threading.Thread(target=work) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert out == [10_000_000] * 8
        print("ok", applied)
    """)
    _run_in_a_child(code)


@pytest.mark.parametrize(("name", "default"), [("malloc_arena_max", 2), ("malloc_mmap_threshold", 65_536)])
def test_the_allocator_settings_default_and_refuse_negative(name: str, default: int) -> None:
    assert getattr(Settings(), name) == default
    with pytest.raises(ValueError, match=name):
        Settings.model_validate({name: -1})


def test_the_collector_threshold_is_raised_and_cycles_are_still_collected() -> None:
    # In a child: the threshold is process-wide.
    code = textwrap.dedent("""
        import gc, weakref
        from streams.memory import raise_collector_threshold
        before = gc.get_threshold()
        assert raise_collector_threshold(0) is False and gc.get_threshold() == before
        assert raise_collector_threshold(5000) is True
        assert gc.get_threshold() == (5000, before[1], before[2])

        class Node:
            pass

        probes = []
        for _ in range(20_000):  # cycles only reference counting cannot free
            a, b = Node(), Node()
            a.other, b.other = b, a
            probes.append(weakref.ref(a))
            del a, b
        # No explicit gc.collect(): the raised threshold alone must have run the collector.
        collected = sum(p() is None for p in probes)
        assert collected > 15_000, collected
        print("ok", collected)
    """)
    _run_in_a_child(code)


def test_the_collector_setting_defaults_to_twenty_thousand() -> None:
    assert Settings().gc_threshold == 20_000
    assert Settings(gc_threshold=0).gc_threshold == 0


_MAPPED_AFTER_A_BIG_FREE = textwrap.dedent("""
    import platform, sys
    from streams.memory import fix_mmap_threshold
    applied = fix_mmap_threshold(int(sys.argv[1]))
    if platform.libc_ver()[0] != "glibc":
        assert applied is False
        print("ok", "not glibc")
        raise SystemExit
    sys.path.insert(0, sys.argv[2])
    from tests.mallochelp import mallinfo
    big = bytes(4_000_000)   # mapped whatever the threshold: it is over 128 KiB
    del big                  # glibc's sliding threshold now rises to 4 MB
    before = mallinfo().hblkhd
    buffer = bytes(200_000)  # a fetch response's size
    mapped = mallinfo().hblkhd - before >= 200_000
    print("ok", applied, mapped)
""")


def _mapped_after_a_big_free(threshold: int) -> tuple[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # where tests.mallochelp is imported from
    done = subprocess.run([sys.executable, "-c", _MAPPED_AFTER_A_BIG_FREE, str(threshold), root],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if done.stdout.split() == ["ok", "not", "glibc"]:
        # The setting exists for glibc only (the child checked it is refused elsewhere); CI and
        # the images are glibc, where this runs.
        pytest.skip("the mmap threshold is a glibc setting; this C library is not glibc")
    _, applied, mapped = done.stdout.split()
    return applied, mapped


def test_a_fixed_mmap_threshold_keeps_buffers_mapped_after_a_big_free() -> None:
    # glibc's own sliding threshold: a 200 kB buffer lands in the heap once 4 MB was freed ...
    assert _mapped_after_a_big_free(0) == ("False", "False")
    # ... fixed at 64 KiB, it still gets a mapping of its own, returned when it is freed.
    assert _mapped_after_a_big_free(65_536) == ("True", "True")
