"""Parity: the compiled gather + decode of table rows (`tables.jit_kernels.gather_decode`) against
today's decode kernel, FBGEMM's row-wise embedding bag (`quant.fused_rowwise_op`), bit for bit, and
the plain torch twin `quant.decode_reference` (equal values; that twin may keep a -0.0 the FBGEMM
sum turns into +0.0). Every float16 scale and bias bit pattern is decoded (subnormals, zeros of
both signs, infinities, NaNs), at 4 and 2 bits, even and odd dims. Skipped without numba."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.kernels import jit
from lowbit.tables import build, jit_kernels, open_table
from lowbit.tables.format import Layout
from lowbit.tables.quant import decode_reference, fused_rowwise_op

pytest.importorskip("numba")
ALL_HALVES = 1 << 16


def decoder():
    k = jit.kernel("gather_decode", define=jit_kernels.define)
    assert k is not None, jit.status()
    return k


def every_half_records(layout: Layout, seed: int) -> np.ndarray:
    """(65536, record_bytes): random codes; row i's scale is float16 pattern i, its bias pattern
    i * 40503 mod 2**16 (every pattern once, paired differently)."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (ALL_HALVES, layout.record_bytes), dtype=np.uint8)
    c = layout.code_bytes
    pattern = np.arange(ALL_HALVES, dtype=np.uint32)
    rec[:, c:c + 2] = pattern.astype("<u2").view(np.uint8).reshape(-1, 2)
    rec[:, c + 2:c + 4] = ((pattern * 40503) % ALL_HALVES).astype("<u2").view(np.uint8).reshape(-1, 2)
    return rec


def fbgemm(rec: np.ndarray, pos: np.ndarray, layout: Layout) -> np.ndarray:
    op = fused_rowwise_op(layout)
    if op is None:
        pytest.skip("this torch has no FBGEMM row-wise kernel")
    out = op(torch.from_numpy(rec), torch.from_numpy(pos), torch.arange(pos.size, dtype=torch.int64),
             False, 0, False, None, None, False).numpy()
    return out[:, :layout.dim]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, NaNs compared as NaN (their payloads are the CPU's business)."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))
                and np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]))


@pytest.mark.parametrize("bits,dim", [(4, 64), (4, 5), (2, 7), (2, 64), (4, 1)])
def test_every_float16_parameter_decodes_like_fbgemm(bits, dim):
    layout = Layout(dim=dim, bits=bits)
    rec = every_half_records(layout, seed=bits * 100 + dim)
    pos = np.arange(ALL_HALVES, dtype=np.int64)
    got = decoder()(rec, pos, dim, bits)
    assert got.shape == (ALL_HALVES, dim) and got.dtype == np.float32
    assert same_bits(got, fbgemm(rec, pos, layout))
    ref = decode_reference(torch.from_numpy(rec), layout).numpy()
    assert np.array_equal(got, ref, equal_nan=True)  # -0.0 == +0.0 here
    assert np.isnan(got).any() and np.isinf(got).any()  # the patterns really covered them


@pytest.mark.parametrize("bits", [4, 2])
def test_gather_with_duplicates_and_empty(bits):
    layout = Layout(dim=64, bits=bits)
    rec = every_half_records(layout, seed=9)[30000:31000]  # finite, ordinary parameters mostly
    rng = np.random.default_rng(1)
    pos = np.concatenate([rng.integers(0, 1000, 300), [999, 0, 0, 999]]).astype(np.int64)
    assert same_bits(decoder()(rec, pos, 64, bits), fbgemm(rec, pos, layout))
    assert same_bits(decoder()(rec, pos[::-3], 64, bits), fbgemm(rec, pos[::-3].copy(), layout))
    empty = decoder()(rec, np.empty(0, np.int64), 64, bits)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("shards", [1, 3])
def test_table_lookup_equals_the_fbgemm_path(tmp_path, monkeypatch, shards):
    """Dense and hashed tables: `lookup` with compiled kernels vs LOWBIT_JIT=0 (FBGEMM decode)."""
    rng = np.random.default_rng(shards)
    x = rng.standard_normal((3000, 40), dtype=np.float32) * rng.lognormal(0, 1.5, (3000, 1)).astype(np.float32)
    keys = rng.integers(-2 ** 63, 2 ** 63 - 1, 3000, dtype=np.int64)
    build(x, tmp_path / "h", keys=keys, bits=4, shards=shards, workers=0, progress=False)
    build(x, tmp_path / "d", bits=2, shards=shards, workers=0, progress=False)
    hashed, dense = open_table(tmp_path / "h"), open_table(tmp_path / "d")
    qh = keys[rng.integers(0, 3000, 500)]
    qd = rng.integers(0, 3000, 500)
    monkeypatch.delenv(jit.ENV, raising=False)
    decoder()
    got = hashed.lookup(qh), dense.lookup(qd), dense.lookup(np.array([5, 99999]), on_missing="zeros")
    monkeypatch.setenv(jit.ENV, "0")
    want = hashed.lookup(qh), dense.lookup(qd), dense.lookup(np.array([5, 99999]), on_missing="zeros")
    for g, w in zip(got, want):
        assert same_bits(g, w)
    assert not got[2][1].any() and got[2][0].any()
