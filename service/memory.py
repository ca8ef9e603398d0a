"""Keep freed memory in the process instead of giving it back to the kernel after every batch.

glibc serves an allocation over its mmap threshold (128 kB at first) with a fresh ``mmap`` and returns
it on free, and trims the top of the heap back to the kernel past its trim threshold. The engine core
allocates and frees the same few tensors of 0.1-10 MB every batch (gathered windows, currents, spikes),
so with the defaults every batch page-faults its working set in again: measured on the 2-core CPU,
bench net (28-128-128-10 sliding PSN, k=8), one backend call: 256 sessions x 1 step 2.6-3.7 ms with
the defaults, 1.0-1.1 ms with both thresholds raised; 256 x 16 steps 13-16 ms against 8-9.6 ms
(BENCHMARKS.md). Raising both thresholds keeps up to ``keep_mb`` of freed memory for reuse.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("psn.memory")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MAX_MMAP_THRESHOLD = 32 << 20  # older glibc refused more on 64-bit (HEAP_MAX_SIZE / 2); 2.36 takes 1 GiB, kept as is
MAX_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int; ctypes wraps a larger value (4096 MB: 0, trim always)
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(keep_mb: int) -> bool:
    """Raise glibc's mmap and trim thresholds so that freed blocks up to ``keep_mb`` MB (at most 2 GiB: mallopt
    takes a C int) are reused, not returned to the kernel. True if applied; False with ``keep_mb`` = 0, off
    glibc, or where the environment already sets malloc's thresholds (the operator's choice wins)."""
    if keep_mb <= 0 or not sys.platform.startswith("linux"):
        return False
    if any(os.environ.get(name) for name in ENV):
        log.info("malloc thresholds left as the environment sets them")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    size = min(keep_mb << 20, MAX_TRIM_THRESHOLD)
    ok = mallopt(M_MMAP_THRESHOLD, min(size, MAX_MMAP_THRESHOLD)) == 1 and mallopt(M_TRIM_THRESHOLD, size) == 1
    if not ok:
        log.warning("mallopt refused the thresholds for PSN_MALLOC_KEEP_MB=%d; batches may page-fault", keep_mb)
    return ok
