"""System memory for tensors on Linux with glibc: freed buffers kept for the next step instead of being handed
back to the OS and faulted in again page by page.

glibc's malloc gives every allocation above its mmap threshold (which it adapts, up to 32 MiB) a mapping of
its own, unmapped on free, and trims the heap's top when more than its trim threshold is free. A training
step allocates and frees the same large activations every step, so every step touched fresh pages: on an
SD1.5 LoRA step at 256 px, about 580,000 minor page faults and a second of kernel time (bench/allocator.py).
`keep_freed_memory` raises both thresholds, so freed buffers are reused; a job calls it as it starts and
`release_freed_memory` (malloc_trim) once it has ended, so an idle app holds no more than it uses.

The thresholds only hold in glibc's main heap. Every other thread gets an arena of its own at its first
allocation, made of 64 MiB heaps: a larger buffer is mapped and unmapped on every use whatever the threshold,
and a training run's loop is such a thread (it faulted ~0.9 CPU-s per step in again on the step above). So
`keep_freed_memory` also limits the process to the main arena, which only applies to threads that have not
allocated yet: the CLI and the app call it first thing, before any thread starts.
Elsewhere (Windows, macOS, other C libraries) both do nothing.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Buffers up to this size come from the heap and are reused; larger ones (rare outside a GPU) keep their own
# mapping. Both are glibc's int parameters.
MMAP_THRESHOLD = 2**30
TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Keep freed buffers in the process for reuse, for every thread that starts after; whether this C library
    took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(libc.mallopt(option, value)) for option, value in settings])  # a list: every one is set


def release_freed_memory() -> None:
    """Give the memory that is free inside the process back to the OS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
