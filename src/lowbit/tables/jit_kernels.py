"""Compiled (numba) kernels of the table lookup, brought to `kernels.jit` as its own kernel table.

``probe``: the `index.KeyIndex` lookup of a batch of keys in one call. Per key: the home bucket
``b = (bits(key) * fib) >> shift`` (Fibonacci hashing, Knuth TAOCP vol. 3, 6.4), a scan of the
bucket's ``ways`` keys in its 64-byte line, the position beside the hit. A key not in its bucket is
absent when the bucket has a free slot (its last key is a sentinel that homes elsewhere); a full
bucket may have overflowed, so the key is then looked for by binary search over the sorted keys.
The numpy `KeyIndex.find_twin` is its twin (equal bit for bit; tests/parity/test_table_probe.py).

``gather_decode``: records at row positions -> float32 rows, for the layouts FBGEMM's row-wise
kernel reads (4 or 2 bits, little-endian codes lowest bits first, then float16 scale and bias;
`quant` and `primitives.packing` draw the bytes). Per element ``code * scale + (0 + bias)`` in
float32: ``code * scale`` is exact (a 4-bit code times an 11-bit float16 significand), so this
rounds once, like FBGEMM's ``fma(scale, code, 0 + bias)`` and `quant.decode_reference`'s
``codes * scale + bias``; the float16 parameters widen exactly through their bit patterns (numba has
no float16). Its twins: the FBGEMM kernel (`quant.fused_rowwise_op`) and `decode_reference`
(tests/parity/test_table_decode.py, bit for bit).

This file holds the kernels only: numba keys its disk cache on this file, so editing `index.py`
does not recompile them, and every constant (``fib``, ``shift``, the ways from the table's shape)
comes in as an argument. numba is imported inside `define`, never at import.
"""
from __future__ import annotations

from typing import Callable


def define() -> dict[str, Callable]:
    """``{"probe", "gather_decode"}`` -> dispatchers, compiled on first call (or loaded from numba's
    disk cache)."""
    return {"probe": _probe(), "gather_decode": _gather_decode()}


def _probe() -> Callable:
    import numpy as np
    from numba import njit

    @njit(cache=True, nogil=True)
    def probe(table, keys, q, fib, shift):
        """table: (buckets, 2 * ways) uint64, ``[key_0 .. | pos_0 ..]`` a row; keys: sorted unique
        (n,) int64 or uint64; q: (m,) queries of the keys' dtype; fib, shift: uint64.
        Returns pos (m,) int64 (0 where missing), found (m,) bool, and the count missing."""
        ways = table.shape[1] // 2
        m, n = q.size, keys.size
        pos = np.empty(m, np.int64)
        found = np.ones(m, np.bool_)
        missing = 0
        touched = np.uint64(0)
        for i in range(m):  # touch every bucket first: the cache misses overlap (a prefetch pass)
            touched += table[(np.uint64(q[i]) * fib) >> shift, 0]
        pos[0:min(m, 1)] = np.int64(touched & np.uint64(1))  # kept; every pos[i] is set below
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
            pos[i] = 0
            found[i] = False
            missing += 1
        return pos, found, missing

    return probe


def _half_bits() -> Callable:
    from numba import njit

    @njit(inline="always")
    def half_bits(h):
        """float16 bit pattern -> float32 bit pattern of the same value (exact)."""
        sign = (h & 0x8000) << 16
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        if e == 31:  # inf / nan (payload kept)
            return sign | 0x7F800000 | (m << 13)
        if e != 0:
            return sign | ((e + 112) << 23) | (m << 13)
        if m == 0:
            return sign
        e32 = 113  # subnormal m * 2**-24: normalize to 1.f * 2**(e32 - 127)
        while (m & 0x400) == 0:
            m <<= 1
            e32 -= 1
        return sign | (e32 << 23) | ((m & 0x3FF) << 13)

    return half_bits


def _gather_decode() -> Callable:
    import numpy as np
    from numba import njit
    half_bits = _half_bits()

    @njit(cache=True, nogil=True)
    def gather_decode(records, pos, dim, bits):
        """records (rows, code_bytes + 4) uint8; pos (n,) int64 row positions; bits 4 or 2.
        Returns (n, dim) float32."""
        n = pos.size
        c = records.shape[1] - 4  # code bytes; then scale, bias (float16, little-endian)
        per = 8 // bits
        mask = (1 << bits) - 1
        whole = dim // per  # bytes whose codes all land in the row
        out = np.empty((n, dim), np.float32)
        word = np.empty(2, np.uint32)
        params = word.view(np.float32)
        touched = np.uint32(0)
        for i in range(n):  # touch every row first: the cache misses overlap (a prefetch pass)
            touched += records[pos[i], 0] + records[pos[i], c + 3]
        word[0] = touched  # kept, so the pass is not optimized away; overwritten below
        for i in range(n):
            r = pos[i]
            word[0] = half_bits(np.uint32(records[r, c]) | (np.uint32(records[r, c + 1]) << 8))
            word[1] = half_bits(np.uint32(records[r, c + 2]) | (np.uint32(records[r, c + 3]) << 8))
            scale = params[0]
            bias = np.float32(0.0) + params[1]  # FBGEMM adds the bias to a zeroed sum first
            if bits == 4:
                for b in range(whole):
                    v = records[r, b]
                    out[i, 2 * b] = np.float32(v & 15) * scale + bias
                    out[i, 2 * b + 1] = np.float32(v >> 4) * scale + bias
            else:
                for b in range(whole):
                    v = records[r, b]
                    out[i, 4 * b] = np.float32(v & 3) * scale + bias
                    out[i, 4 * b + 1] = np.float32((v >> 2) & 3) * scale + bias
                    out[i, 4 * b + 2] = np.float32((v >> 4) & 3) * scale + bias
                    out[i, 4 * b + 3] = np.float32(v >> 6) * scale + bias
            for j in range(whole * per, dim):  # the last, partly used byte
                out[i, j] = np.float32((records[r, whole] >> ((j - whole * per) * bits)) & mask) * scale + bias
        return out

    return gather_decode
