"""Hand freed heap pages back to the OS after a load (glibc's ``malloc_trim``; a no-op elsewhere).

A load reads the file's tensors, and each layer converts its codes to the layout it keeps (one
copy, `kernels.layout`) and drops the file form; glibc keeps those freed blocks as heap, so the
process's resident memory would still count them. `hf.quantizer` calls it after each layer
it quantizes at load time, where the float temporaries would otherwise pile up as heap."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


def release_freed_memory() -> None:
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
