"""Process-level tuning for the long-running parts (the cloud front, the edge agent)."""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Take everything allocated so far out of the garbage collector's reach (gc.freeze).

    Importing torch, Ray and grpc leaves ~400,000 tracked objects that live as long as the process. Every full
    collection walks all of them: 0.1-0.3 s with the GIL held, during which the front's event loop answers
    nothing (docs/cloud.md). Frozen, they are skipped; objects allocated later are collected as before.
    Call it once, when startup is done.
    """
    gc.collect()
    gc.freeze()
