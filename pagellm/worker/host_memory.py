"""Keep freed host memory in the process (glibc), so a CPU step does not page-fault on every tensor.

glibc returns large freed blocks to the OS (blocks from mmap, and the heap's top past a trim
threshold). A CPU decode step allocates tens of MB of short-lived tensors (gathered K/V blocks,
[batch, vocab] logits), so every step would map fresh pages and fault on each 4 KiB of them. Raising
both thresholds keeps that memory for reuse, as tcmalloc or jemalloc would (vLLM's CPU docs preload
one of those for the same reason). Measured on the 2-core CPU VM: 32 requests of 1,050 prompt tokens,
64 decode steps, 12-15% faster in paired runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # bytes; an explicit setting also turns off glibc's dynamic adjustment
_done = False


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory; a no-op (False) on other C libraries. Idempotent."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    _done = ok
    if ok:
        logger.debug("malloc keeps freed memory (mmap and trim thresholds 1 GiB)")
    return ok
