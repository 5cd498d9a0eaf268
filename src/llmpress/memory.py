"""Keep peak memory at one layer without paying for it in page faults.

glibc's defaults fit neither end of a layer-by-layer run. Its mmap threshold rises each time a
large block is freed, so after the first layer every layer-sized tensor comes from the heap,
whose freed pages fragment and stay resident: measured here, peak RSS grew by ~1.2x the model
size. Forcing every block over 1 MiB into its own mapping (session 3's fix) returns them on
free, but then each activation, Hessian product and temporary of every batch is a fresh
mapping that the kernel zero-fills on first touch: a 2:4 SparseGPT run of SmolLM2 spent 54
of its 310 CPU seconds in the kernel, on 22 million page faults.

So blocks up to 32 MiB (the batches' working set) come from the heap and stay there while the
layer runs, reused without faults; larger ones (big models' weight matrices) keep their own
mappings; and once a layer is done (in one-pass runs, once each module group is compressed,
while the paused batches hold their states), `return_freed_memory` hands every free heap page
back (malloc_trim), so that fragments never add up. These are glibc's
documented tunables (mallopt), applied at run time; elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving threshold
_TRIM_THRESHOLD = 1 << 30  # never shrink the heap on free: return_freed_memory does it


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both glibc's, or neither
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return None
    return libc


@functools.cache
def release_large_blocks_to_os() -> bool:
    """Fix glibc's thresholds for this process (module docstring); True when they took
    effect."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def return_freed_memory() -> None:
    """Give the free pages of the heap back to the OS: at a layer's end, when its batches'
    temporaries are gone."""
    libc = _libc()
    if libc is not None and release_large_blocks_to_os():
        libc.malloc_trim(0)
