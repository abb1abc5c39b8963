"""The worker process's allocator settings.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core)
and returns freed memory only to the arena it came from. In a worker, Faust's consumer thread
builds every fetched record and the main thread frees them after grading: with the default
arenas the worker's peak RSS above ready was 159 MB per 100k customers in a `make bench` run
where two arenas gave 116 (docs/performance.md §11). ``mallopt(M_ARENA_MAX)`` is what the
``MALLOC_ARENA_MAX`` environment variable sets, applied before the worker starts its threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: leave the allocator alone); whether it was applied.

    Not glibc (musl, macOS): nothing happens and False is returned; the worker runs as before."""
    if arenas <= 0:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_ARENA_MAX, arenas) == 1
