"""The worker process's allocator and garbage-collector settings.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core)
and returns freed memory only to the arena it came from. In a worker, Faust's consumer thread
builds every fetched record and the main thread frees them after grading: with the default
arenas the worker's peak RSS above ready was 159 MB per 100k customers in a `make bench` run
where two arenas gave 116 (docs/performance.md, "Memory: right-sized bytes and malloc settings"). ``mallopt(M_ARENA_MAX)`` is what the
``MALLOC_ARENA_MAX`` environment variable sets, applied before the worker starts its threads.

glibc serves an allocation of at least its mmap threshold (128 KiB at start) with a mapping of
its own, returned to the system when freed; but freeing such a mapping raises the threshold to
its size (up to 32 MiB), and from then on the consumer's fetch responses (up to 1 MiB per
partition), the producer's batches and the batch handler's buffers come from the heap, where
freed space between live chunks is held rather than returned. Sampled through a `make bench`
worker (mallinfo2, docs/performance.md, "Memory: right-sized bytes and malloc settings"), the heap reached 65 MB with 35 MB of it in use; with
the threshold fixed at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_``
sets; a fixed value also turns the raising off) the same run peaked 11 MB lower.

CPython's cycle collector runs a young-generation pass each time 700 more container objects are
allocated than freed. Grading a batch allocates tens of thousands (decoded events and states,
change documents) that are freed a moment later, so the collector ran ~60 times a second and,
every hundred passes, walked the whole heap: 7% of a worker's CPU in a `make bench` run
(docs/performance.md, "The cycle collector"). Raising the first threshold lets a batch's garbage be freed by
reference counting before a pass is due; cycles (Faust's and asyncio's) are still collected,
only after more of them have piled up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_ARENA_MAX = -8  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: leave the allocator alone); whether it was applied.

    Not glibc (musl, macOS): nothing happens and False is returned; the worker runs as before."""
    if arenas <= 0:
        return False
    return _mallopt(_M_ARENA_MAX, arenas)


def fix_mmap_threshold(threshold: int) -> bool:
    """Serve glibc allocations of ``threshold`` bytes or more with mappings of their own, returned
    when freed, and keep the threshold there (0: leave glibc's sliding threshold); whether it was
    applied. Not glibc: nothing happens and False is returned."""
    if threshold <= 0:
        return False
    return _mallopt(_M_MMAP_THRESHOLD, min(threshold, _MAX_MMAP_THRESHOLD))


def _mallopt(option: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(option, value) == 1


def raise_collector_threshold(threshold: int) -> bool:
    """Run the cycle collector's young pass after ``threshold`` net container allocations instead of
    700 (0: leave the collector alone); whether it was changed. The older generations keep their
    ratios, so a full pass stays as rare, relative to young passes, as CPython makes it."""
    if threshold <= 0:
        return False
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    return True
