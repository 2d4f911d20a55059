"""`KeyIndex`: key -> row position for tables with arbitrary 64-bit keys.

A bucketed hash built once at open, vectorized: bucket ``b = (key * FIB) >> (64 - log2(buckets))``
(Fibonacci hashing of the key's 64-bit pattern) holds up to ``WAYS`` = 8 keys in one 64-byte row
of ``bucket_keys`` (buckets, 8) and their positions in ``bucket_pos`` (buckets, 8); about
``1 / LOAD`` slots per key. A lookup gathers each key's bucket row, compares the 8 keys at once and
takes the position: no loop. A key that did not fit its bucket (rare) or is absent falls back to a
binary search over the sorted keys, which is also `find_reference`, the plain twin.
Empty slots hold a sentinel key that hashes to another bucket, so it never matches a query.
"""
from __future__ import annotations

import numpy as np

FIB = np.uint64(0x9E3779B97F4A7C15)
WAYS = 8
LOAD = 0.375  # keys per slot: mean 3 keys a bucket; about 0.05% of keys overflow to the binary search


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
        self.bucket_keys = self._sentinels(nb)  # (nb, WAYS)
        self.bucket_pos = np.zeros((nb, WAYS), dtype=np.int32 if n < 2 ** 31 else np.int64)
        rows, ways = home[order][fit], rank[fit]
        self.bucket_keys[rows, ways] = keys[order][fit]
        self.bucket_pos[rows, ways] = order[fit]
        self.overflow = int((~fit).sum())

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
        """Positions (int64) of keys ``k`` (same dtype as the index) and a found mask (None: all found)."""
        home = self._home(k)
        hit = self.bucket_keys[home] == k[:, None]  # (n, WAYS)
        way = hit.argmax(axis=1)
        pos = self.bucket_pos[home, way].astype(np.int64)
        ok = hit.any(axis=1)
        if ok.all():
            return pos, None
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
