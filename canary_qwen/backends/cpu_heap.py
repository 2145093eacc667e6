"""glibc's allocator told to keep freed memory in the process while the fast path runs on a CPU.

By default glibc serves every allocation over 128 KiB - 32 MiB with its own ``mmap`` and returns it to the
kernel when freed, so each activation tensor of a forward pass is fresh memory the kernel has to
fault in page by page: ~1.1 million page faults and ~2 s of kernel time in a ~15 s batch of 16 clips
on the full-size model (docs/fast-path.md). Kept in the heap instead, the next layer's tensors reuse
the same pages. Preloading ``jemalloc`` or ``tcmalloc`` is the usual whole-process remedy; this needs
nothing installed and holds only while the fast path runs.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536

_lock = threading.Lock()
_holders = 0


@functools.cache
def _glibc():
    """The C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else None (musl, macOS, ...)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Inside: no allocation gets its own mapping and the heap's free top is not given back, so freed
    memory is reused without page faults. Leaving (the last of overlapping holders, e.g. concurrent
    requests): glibc's default limits again, and the free memory returned to the kernel (``malloc_trim``),
    so resident memory falls back as before. glibc's own raising of its mmap threshold stays off after the
    first use (setting M_MMAP_MAX turns it off: malloc.c ``do_set_mmaps_max``). Elsewhere than glibc
    it does nothing."""
    global _holders
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _holders += 1
        if _holders == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
