"""Keep glibc malloc from handing the trainer's large CPU tensors back to the kernel after every use.

A CPU training step allocates and frees the same few large tensors (logits,
activations, gradients: megabytes each) many times a step. glibc serves a
block above its mmap threshold (128 KiB, raised as blocks are freed) with a
fresh mmap and returns it on free, and trims the heap's top once more than
twice that threshold is free, so the next step faults every page in again:
measured on the issue's shape (depth 2, 8,192-token steps, 1 thread), ~110,000
minor faults a step and 30-40 % of the step's wall time, most of it spent
outside the process (a VM's page faults are not even counted as system time).

Fixing both thresholds (mmap at glibc's ceiling, 32 MiB; trim at 1 GiB) makes
freed blocks stay in the heap for reuse: ~1 % of the faults. The price is that
up to 1 GiB of freed memory may stay resident; the next step reuses it anyway.
Only glibc has these knobs; elsewhere this does nothing. It changes where
memory comes from, never a value, so results are bitwise the same.
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20   # the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds; True when glibc took both."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded: libc's, without find_library's ldconfig run
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc: another allocator with other knobs (or none)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
