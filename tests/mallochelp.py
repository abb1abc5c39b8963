"""Bytes held by glibc's malloc (mallinfo2's in-use count), to check what an object really holds:
an orjson output of 300 bytes holds a 4 KiB allocation, which ``sys.getsizeof`` does not show.
Python's own allocator serves objects of up to 512 bytes from arenas mallinfo2 does not count."""

from __future__ import annotations

import ctypes
import platform

import pytest


class _Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> _Info:
    """glibc's ``mallinfo2()`` now (glibc only): ``uordblks`` in use in the heap, ``hblkhd`` mapped."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Info
    return mallinfo2()


def malloc_in_use() -> int:
    """Bytes of glibc malloc's heap in use now; the calling test is skipped off glibc."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallinfo2 is glibc's")
    return int(mallinfo().uordblks)
