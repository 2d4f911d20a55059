"""`KeyIndex`: key -> row position for tables with arbitrary 64-bit keys.

A bucketed hash built once at open, vectorized: bucket ``b = (key * FIB) >> (64 - log2(buckets))``
(Fibonacci hashing of the key's 64-bit pattern) holds up to ``WAYS`` = 4 keys and their row
positions in one 64-byte row of ``table`` (buckets, 8): ``[key_0 .. key_3 | pos_0 .. pos_3]``
(keys as their 64-bit pattern), one cache line a probe; about ``1 / LOAD`` slots per key. A lookup gathers each key's bucket
row (one gather), compares the 8 keys at once and reads the position beside the hit: no loop. A key that did not fit its bucket (rare) or is absent falls back to a
binary search over the sorted keys, which is also `find_reference`, the plain twin.
Empty slots hold a sentinel key that hashes to another bucket, so it never matches a query.

`find` runs the probe as one compiled loop (`jit_kernels.probe`, numba through `kernels.jit`) when
compiled kernels are on: the numpy version's half-dozen ops cost about 2 us each whatever the
batch, more than the probe's work at 100 keys. The numpy version (`find_twin`) is its twin and the
fallback (no numba, or ``LOWBIT_JIT=0``); both give the same positions and masks bit for bit.
"""
from __future__ import annotations

import numpy as np

from ..kernels import jit
from . import jit_kernels

FIB = np.uint64(0x9E3779B97F4A7C15)
WAYS = 4  # 4 x (8-byte key + 8-byte position) = one 64-byte cache line a bucket
POS_AT_CACHE = 1 << 14
LOAD = 0.25  # keys per slot, at least: mean <= 1 key a bucket; about 0.4% of keys overflow to the
#  binary search. (8 ways in 128 bytes at 0.375, the same memory, took 1.3-1.6x the time a batch.)


class KeyIndex:
    def __init__(self, keys: np.ndarray) -> None:
        """``keys``: sorted unique int64 or uint64 (n,)."""
        self.keys = keys
        n = keys.size
        self.bits = max(1, int(np.ceil(np.log2(max(n, 1) / (LOAD * WAYS)))))
        self.shift = np.uint64(64 - self.bits)
        nb = 1 << self.bits
        home = self._home(keys)  # (n,)
        order = np.argsort(home, kind="stable")  # (n,) grouped by bucket
        first = np.searchsorted(home[order], np.arange(nb))  # (nb,) start of each bucket's run
        rank = np.arange(n) - first[home[order]]  # place inside the bucket
        fit = rank < WAYS
        self.table = np.zeros((nb, 2 * WAYS), dtype=np.uint64)  # (nb, 8): 4 keys | 4 positions
        self.table[:, :WAYS] = self._sentinels(nb).view(np.uint64)
        rows, ways = home[order][fit], rank[fit]
        self.table[rows, ways] = keys[order][fit].view(np.uint64)
        self.table[rows, WAYS + ways] = order[fit].astype(np.uint64)
        self.overflow = int((~fit).sum())
        self._pos_at = np.arange(POS_AT_CACHE) * 2 * WAYS + WAYS  # flat offset of pos_0 in row i

    def _home(self, k: np.ndarray) -> np.ndarray:
        return ((k.view(np.uint64) * FIB) >> self.shift).astype(np.int64)

    def _sentinels(self, nb: int) -> np.ndarray:
        """(nb, WAYS) filled, per bucket, with a key that hashes elsewhere."""
        cand = np.array([0, 1, 2], dtype=self.keys.dtype)
        home = self._home(cand)
        a, b = cand[0], cand[1] if home[1] != home[0] else cand[2]
        fill = np.full(nb, a, dtype=self.keys.dtype)
        fill[self._home(np.array([a], dtype=self.keys.dtype))[0]] = b
        return np.repeat(fill[:, None], WAYS, axis=1)

    def find(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Positions (int64) of keys ``k`` (same dtype as the index; 0 where missing) and a found
        mask (None: all found). The compiled probe when available, else `find_twin`."""
        probe = jit.kernel("probe", k.size, define=jit_kernels.define)
        if probe is None:
            return self.find_twin(k)
        pos, found, missing = probe(self.table, self.keys, k, FIB, self.shift)
        return pos, (found if missing else None)

    def find_twin(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`find` in numpy ops (the compiled probe's twin and fallback)."""
        n = k.size
        rows = np.take(self.table, (k.view(np.uint64) * FIB) >> self.shift, axis=0)  # (n, 8)
        hit = rows[:, :WAYS] == k.view(np.uint64)[:, None]  # (n, WAYS); keys are unique: <= 1 hit a row
        at = self._pos_at[:n] if n <= self._pos_at.size else np.arange(n) * 2 * WAYS + WAYS
        pos = np.take(rows.reshape(-1), at + hit.argmax(axis=1)).view(np.int64)  # (n,): beside the hit
        if np.count_nonzero(hit) == n:
            return pos, None
        ok = hit.any(axis=1)
        miss = np.flatnonzero(~ok)  # overflowed or absent: binary search
        p, found = self.find_reference(k[miss])
        pos[miss], ok[miss] = p, found
        if ok.all():
            return pos, None
        return np.where(ok, pos, 0), ok

    def find_reference(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.keys, k), self.keys.size - 1)
        ok = self.keys[pos] == k
        return np.where(ok, pos, 0), ok
