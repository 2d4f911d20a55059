"""The hashed key index (tables/index.py) against its binary-search twin: exact positions and found
masks for present, absent, overflowing and extreme keys."""
from __future__ import annotations

import numpy as np
import pytest

from lowbit.tables.index import WAYS, KeyIndex


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_index_matches_binary_search(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    keys = np.unique(rng.integers(info.min, info.max, 20000, dtype=dtype, endpoint=True))
    keys = np.unique(np.concatenate([keys, np.array([info.min, info.max, 0, 1, 2], dtype=dtype)]))
    idx = KeyIndex(keys)
    queries = np.concatenate([keys[rng.integers(0, keys.size, 5000)],
                              rng.integers(info.min, info.max, 500, dtype=dtype, endpoint=True),
                              np.array([info.min, info.max, 0, 1, 2, 3], dtype=dtype)])
    pos, ok = idx.find(queries)
    ref_pos, ref_ok = idx.find_reference(queries)
    assert ok is not None and np.array_equal(ok, ref_ok) and np.array_equal(pos, ref_pos)
    assert ok[:5000].all() and np.array_equal(keys[pos[:5000]], queries[:5000])


def test_overflowing_buckets_fall_back_to_binary_search():
    probe = KeyIndex(np.arange(64, dtype=np.uint64))  # 64 keys: the same bucket count as below
    cand = np.arange(100000, dtype=np.uint64)
    home = probe._home(cand)
    keys = np.sort(np.concatenate([cand[home == 0][:WAYS + 4], cand[home != 0][:52 - WAYS]]))
    idx = KeyIndex(keys)
    assert idx.overflow == 4  # bucket 0 got WAYS + 4 keys for WAYS slots
    pos, ok = idx.find(keys)
    assert ok is None and np.array_equal(pos, np.arange(keys.size))
