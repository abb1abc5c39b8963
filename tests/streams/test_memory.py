"""streams/memory.py: the worker's malloc arena cap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from streams.memory import limit_malloc_arenas
from streams.settings import Settings


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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_the_setting_defaults_to_two_and_refuses_negative() -> None:
    assert Settings().malloc_arena_max == 2
    try:
        Settings(malloc_arena_max=-1)
    except ValueError as error:
        assert "malloc_arena_max" in str(error)
    else:
        raise AssertionError("a negative arena count was accepted")
