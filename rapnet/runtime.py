"""Process-level tuning for the long-running parts (the cloud front and replicas, the edge agent)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); larger blocks are mmapped regardless.
_MMAP_THRESHOLD_MAX = 32 << 20


def freeze_startup_heap() -> None:
    """Take everything allocated so far out of the garbage collector's reach (gc.freeze).

    Importing torch, Ray and grpc leaves ~400,000 tracked objects that live as long as the process. Every full
    collection walks all of them: 0.1-0.3 s with the GIL held, during which the front's event loop answers
    nothing (docs/cloud.md). Frozen, they are skipped; objects allocated later are collected as before.
    Call it once, when startup is done.
    """
    gc.collect()
    gc.freeze()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    torch allocates every activation of a forward pass afresh. By default glibc serves large blocks with mmap
    and trims the heap's free top, so a batch's activations are new pages that the kernel must fault in and
    zero: ~240 minor page faults per sample for the cloud stages at split 4, batch 16, which one thread then
    ran 1.4x faster without them (benchmarks/allocator_bench.py, docs/cloud.md). Batch-1 edge calls fault
    nothing either way. The process keeps its peak heap (tens of MB for these models). Returns False,
    changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # mallopt returns 1 on success; fixing either threshold also turns off glibc's dynamic adjustment of both.
        if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1:
            return True
    log.info("no glibc mallopt here: freed memory goes back to the kernel as usual")
    return False
