"""Allocator settings for bulk inference (opt-in, process-wide).

:func:`keep_freed_memory` makes glibc keep and reuse the pages of large freed blocks, so a
loop of identical forwards stops faulting in fresh memory on every call (measured in
``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep and reuse freed memory (opt-in, process-wide, Linux/glibc).

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a
    fresh ``mmap`` and returns it on ``free``; a batch-16 ResNet-50 forward's activations are
    such blocks, so each call faults in ~1.3 GB of new pages (~340k minor faults on the
    benchmark machine). This calls ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the
    heap) and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (freed heap memory is not handed
    back below that size), the run-time equivalent of starting the process with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>``. Repeated forwards then reuse their
    pages (zero minor faults per call after the first); the price is that the process keeps
    its peak RSS. Measured in ``docs/benchmarks.md``.

    Args:
        trim_threshold: bytes of free memory at the top of the heap kept before trimming.

    Returns:
        True when both options were set; False on a platform without glibc's ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim = max(0, min(int(trim_threshold), 2**31 - 1))
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
