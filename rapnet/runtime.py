"""Process-level tuning for the long-running parts (the cloud front and replicas, the edge agent)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from pathlib import Path

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
    nothing. Frozen, they are skipped; objects allocated later are collected as before.
    Call it once, when startup is done.
    """
    gc.collect()
    gc.freeze()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    torch allocates every activation of a forward pass afresh. By default glibc serves large blocks with mmap
    and trims the heap's free top, so a batch's activations are new pages that the kernel must fault in and
    zero: ~240 minor page faults per sample for the cloud stages at split 4, batch 16, which one thread then
    ran 1.4x faster without them (benchmarks/allocator_bench.py). Batch-1 edge calls fault
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


def prefer_throughput_scheduling() -> bool:
    """Run every thread of this process under Linux's SCHED_BATCH policy; threads started later inherit it.

    Under the default policy a thread that wakes up (a gRPC poller, Serve's event loop, the front answering a call)
    may preempt the thread running a forward pass. In a 32-client run the replica's compute thread was switched out
    300-800 times a second and spent ~1.2x the CPU per sample of bare torch alone. SCHED_BATCH threads do not
    preempt on wake-up: they take an idle CPU or wait for the next scheduler tick. Replicas and the front served
    8-13 % more with it (interleaved runs of benchmarks/cloud_bench.py). It needs no privileges and leaves nice values alone.
    Returns False, changing nothing, where the platform has no SCHED_BATCH.
    """
    if not hasattr(os, "SCHED_BATCH"):
        log.info("no SCHED_BATCH on this platform: scheduling left as it is")
        return False
    set_thread_scheduling(os.SCHED_BATCH)
    return True


def set_thread_scheduling(policy: int, pid: int | None = None) -> None:
    """Put every thread of process `pid` (default: this one) under `policy` (os.SCHED_OTHER, os.SCHED_BATCH, ...)."""
    for task in Path(f"/proc/{pid or os.getpid()}/task").iterdir():
        try:
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile


def thread_scheduling_policies(pid: int | None = None) -> set[str]:
    """The scheduling policies the threads of process `pid` (default: this one) run under ("other", "batch", ...)."""
    names = {getattr(os, n): n[6:].lower() for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, n)}
    policies = set()
    for task in Path(f"/proc/{pid or os.getpid()}/task").iterdir():
        try:
            policies.add(names.get(os.sched_getscheduler(int(task.name)), "unknown"))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return policies
