"""Process memory: hand freed heap back to the OS, and read the peak resident size (Linux)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Called
    after each layer quantized at load time or while streaming (without it glibc keeps the float
    temporaries as heap, and resident memory grows with every layer although nothing is held),
    and after `lowbit.load` (each layer converts the file's codes to the layout it keeps and drops
    the file form)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), in MB; None where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
