"""Parity: the compiled hash-index probe (`tables.jit_kernels.probe`, through `KeyIndex.find`)
against its numpy twin (`KeyIndex.find_twin`) and the binary search (`find_reference`): equal
positions and found masks, bit for bit, for present, absent, duplicated, overflowed, sentinel and
extreme keys, empty and strided batches. Skipped without numba (the twin is then `find` itself,
covered by tests/tables/test_index.py)."""
from __future__ import annotations

import numpy as np
import pytest

from lowbit.kernels import jit
from lowbit.tables import build, open_table
from lowbit.tables import jit_kernels
from lowbit.tables.index import WAYS, KeyIndex

pytest.importorskip("numba")
N_KEYS = 20_000
N_QUERIES = 3_000


def compiled_on(monkeypatch) -> None:
    monkeypatch.delenv(jit.ENV, raising=False)
    assert jit.kernel("probe", define=jit_kernels.define) is not None, jit.status()


def assert_same(idx: KeyIndex, q: np.ndarray, all_found: bool | None = None) -> None:
    pos, ok = idx.find(q)
    twin_pos, twin_ok = idx.find_twin(q)
    ref_pos, ref_ok = idx.find_reference(q)
    assert pos.dtype == np.int64 and pos.shape == (q.size,)
    assert np.array_equal(pos, twin_pos) and np.array_equal(pos, ref_pos)
    assert (ok is None) == (twin_ok is None) == bool(ref_ok.all())
    if ok is not None:
        assert ok.dtype == np.bool_ and np.array_equal(ok, twin_ok) and np.array_equal(ok, ref_ok)
    if all_found is not None:
        assert (ok is None) == all_found


def seeded(dtype, seed: int = 0) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    keys = rng.integers(info.min, info.max, N_KEYS, dtype=dtype, endpoint=True)
    keys = np.unique(np.concatenate([keys, np.array([info.min, info.max, 0], dtype=dtype)]))
    return keys, rng


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_probe_equals_twin_on_seeded_keys(dtype, monkeypatch):
    compiled_on(monkeypatch)
    keys, rng = seeded(dtype)
    idx = KeyIndex(keys)
    info = np.iinfo(dtype)
    present = keys[rng.integers(0, keys.size, N_QUERIES)]  # duplicates within the batch too
    absent = rng.integers(info.min, info.max, 500, dtype=dtype, endpoint=True)
    assert np.isin(absent, keys).sum() == 0  # so the masks below are known, not only equal
    assert_same(idx, present, all_found=True)
    assert_same(idx, np.concatenate([present, absent, present[:7]]), all_found=False)
    assert_same(idx, np.array([info.min, info.max, 0, 1, 2], dtype=dtype), all_found=False)
    assert_same(idx, np.array([info.min, info.max, 0], dtype=dtype), all_found=True)
    assert_same(idx, np.repeat(present[:1], 50), all_found=True)
    assert_same(idx, np.empty(0, dtype=dtype), all_found=True)
    assert_same(idx, np.concatenate([present, absent])[::3])  # a strided view
    ro = present.copy()
    ro.setflags(write=False)
    assert_same(idx, ro, all_found=True)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_sentinel_keys_never_match(dtype, monkeypatch):
    """Empty slots hold 0, 1 or 2 (keys that home elsewhere): absent, they must stay absent."""
    compiled_on(monkeypatch)
    keys = np.arange(1000, 1000 + 4000, dtype=dtype) * dtype(7919)
    idx = KeyIndex(keys)
    pos, ok = idx.find(np.array([0, 1, 2, 3], dtype=dtype))
    assert ok is not None and not ok.any() and not pos.any()
    assert_same(idx, np.array([0, 1, 2, 3, keys[5]], dtype=dtype), all_found=False)


def overflowing() -> tuple[KeyIndex, np.ndarray, np.ndarray]:
    """An index whose bucket 0 got WAYS + 4 keys (4 overflow) and candidates absent from it."""
    probe = KeyIndex(np.arange(64, dtype=np.uint64))  # 64 keys: the same bucket count as below
    cand = np.arange(100_000, dtype=np.uint64)
    home = probe._home(cand)
    in_zero, elsewhere = cand[home == 0], cand[home != 0]
    keys = np.sort(np.concatenate([in_zero[:WAYS + 4], elsewhere[:52 - WAYS]]))
    absent_full = in_zero[WAYS + 4:WAYS + 20]  # home to the full bucket 0: binary search, no hit
    absent_free = elsewhere[52 - WAYS:52 - WAYS + 40]  # home to buckets with free slots (mostly)
    return KeyIndex(keys), keys, np.concatenate([absent_full, absent_free])


def test_overflowed_and_colliding_keys(monkeypatch):
    compiled_on(monkeypatch)
    idx, keys, absent = overflowing()
    assert idx.overflow == 4
    pos, ok = idx.find(keys[::-1])
    assert ok is None and np.array_equal(pos, np.arange(keys.size)[::-1])
    assert_same(idx, keys, all_found=True)
    assert_same(idx, absent, all_found=False)
    assert_same(idx, np.concatenate([absent, keys, keys[:3], absent[:2]]), all_found=False)


def test_single_key_index(monkeypatch):
    compiled_on(monkeypatch)
    idx = KeyIndex(np.array([np.iinfo(np.uint64).max], dtype=np.uint64))
    assert_same(idx, np.array([np.iinfo(np.uint64).max, 0, 5], dtype=np.uint64), all_found=False)
    assert_same(idx, np.array([np.iinfo(np.uint64).max] * 3, dtype=np.uint64), all_found=True)


def test_lookup_equals_the_numpy_path(tmp_path, monkeypatch):
    """A hashed table's rows and missing-key handling, compiled probe vs LOWBIT_JIT=0."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 24), dtype=np.float32)
    keys = rng.integers(-2 ** 63, 2 ** 63 - 1, 3000, dtype=np.int64)
    build(x, tmp_path / "t", keys=keys, bits=4, progress=False)
    table = open_table(tmp_path / "t")
    q = np.concatenate([keys[rng.integers(0, 3000, 400)], np.array([12345, -1], dtype=np.int64)])
    compiled_on(monkeypatch)
    got = table.lookup(q, on_missing="zeros")
    got_err = pytest.raises(Exception, table.lookup, q).value
    monkeypatch.setenv(jit.ENV, "0")
    assert jit.kernel("probe", define=jit_kernels.define) is None
    want = table.lookup(q, on_missing="zeros")
    want_err = pytest.raises(Exception, table.lookup, q).value
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not got[-2:].any() and str(got_err) == str(want_err) and "12345, -1" in str(got_err)
