"""Compiled (numba) kernels of the table lookup, brought to `kernels.jit` as its own kernel table.

``probe``: the `index.KeyIndex` lookup of a batch of keys in one call. Per key: the home bucket
``b = (bits(key) * fib) >> shift`` (Fibonacci hashing, Knuth TAOCP vol. 3, 6.4), a scan of the
bucket's ``ways`` keys in its 64-byte line, the position beside the hit. A key not in its bucket is
absent when the bucket has a free slot (its last key is a sentinel that homes elsewhere); a full
bucket may have overflowed, so the key is then looked for by binary search over the sorted keys.
The numpy `KeyIndex.find_twin` is its twin (equal bit for bit; tests/parity/test_table_probe.py).

This file holds the kernels only: numba keys its disk cache on this file, so editing `index.py`
does not recompile them, and every constant (``fib``, ``shift``, the ways from the table's shape)
comes in as an argument. numba is imported inside `define`, never at import.
"""
from __future__ import annotations

from typing import Callable


def define() -> dict[str, Callable]:
    """``{"probe": dispatcher}``: compiled on first call (or loaded from numba's disk cache)."""
    import numpy as np
    from numba import njit

    @njit(cache=True, nogil=True)
    def probe(table, keys, q, fib, shift):
        """table: (buckets, 2 * ways) uint64, ``[key_0 .. | pos_0 ..]`` a row; keys: sorted unique
        (n,) int64 or uint64; q: (m,) queries of the keys' dtype; fib, shift: uint64.
        Returns pos (m,) int64 (0 where missing), found (m,) bool, and the count missing."""
        ways = table.shape[1] // 2
        m, n = q.size, keys.size
        pos = np.zeros(m, np.int64)
        found = np.ones(m, np.bool_)
        missing = 0
        for i in range(m):
            bits = np.uint64(q[i])  # the key's 64-bit pattern (int64 -> uint64 wraps)
            b = (bits * fib) >> shift
            hit = False
            for j in range(ways):
                if table[b, j] == bits:
                    pos[i] = np.int64(table[b, ways + j])
                    hit = True
                    break
            if hit:
                continue
            if (table[b, ways - 1] * fib) >> shift == b:  # a full bucket: maybe overflowed
                lo, hi = 0, n
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if keys[mid] < q[i]:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < n and keys[lo] == q[i]:
                    pos[i] = lo
                    continue
            found[i] = False
            missing += 1
        return pos, found, missing

    return {"probe": probe}
