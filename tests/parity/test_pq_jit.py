"""Parity: the ``jit`` PQ form (`kernels.pq_jit`, numba) against the reference twin (dequantize +
F.linear) and against its torch twin on the same state; serial and parallel variants, uint8 and
int32 codes, with and without bias. Skipped where numba is not installed (the twin runs there)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.kernels import jit, pq, pq_jit
from lowbit.nn.pq import PQLinear
from lowbit.primitives.codebook import CodebookWeight, pack_assignments

pytest.importorskip("numba")
pytestmark = pytest.mark.usefixtures("one_thread")
# float32 sums in another order than the reference GEMM (per block, then over blocks): error
# relative to the output's largest magnitude [worst measured here: 3.5e-7 of it]
PQ_JIT_RTOL = 2e-6
PQ_JIT_ATOL = 1e-6
VARIANTS = ("pq_lut", "pq_lut_par")


def codebook(out: int, inp: int, k: int, bs: int, seed: int = 0) -> CodebookWeight:
    g = torch.Generator().manual_seed(seed)
    cent = (torch.randn(k, bs, generator=g) * 0.05).half()
    a = torch.randint(k, (out, inp // bs), generator=g)  # (out, n_blocks)
    return CodebookWeight(cent, pack_assignments(a, k), (out, inp), bs)


def table() -> dict:
    assert pq_jit.available(), jit.status()
    return jit._tables[pq_jit._define_pq]


def within(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error over the budget's allowance (<= 1 passes)."""
    scale = ref.abs().max().item()
    return (y - ref).abs().max().item() / (PQ_JIT_ATOL + PQ_JIT_RTOL * scale)


SHAPES = [(48, 64, 16, 8), (70, 96, 256, 4), (16, 16, 2, 16), (130, 384, 256, 8), (20, 21, 8, 3)]
# int32 codes (k > 256) on the calling thread only: a second compile of the parallel variant
# costs 6 s here, and its loop is the same source for both index types
CASES = [(v, *s) for v in VARIANTS for s in SHAPES] + [("pq_lut", 33, 40, 300, 8)]


@pytest.mark.parametrize("variant,out,inp,k,bs", CASES)
@pytest.mark.parametrize("m", (1, 5, 64))
@pytest.mark.parametrize("with_bias", (False, True))
def test_kernel_matches_reference_and_twin(variant, out, inp, k, bs, m, with_bias):
    cw = codebook(out, inp, k, bs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, inp, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    cent_t, codes_t = pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw)
    assert codes_t.dtype == (torch.uint8 if k <= 256 else torch.int32)
    b = np.zeros(out, np.float32) if bias is None else bias.numpy()
    tasks = 3  # uneven spans: 3 does not divide 16, 20, 33, 48, 70, 130
    y = torch.from_numpy(table()[variant](x.numpy(), cent_t.numpy(), codes_t.numpy(), b, tasks))
    ref = pq.ref_linear(x, cw, bias)
    assert y.shape == ref.shape
    assert within(y, ref) <= 1.0
    assert within(pq_jit.jit_linear_torch(x, cent_t, codes_t, bias), ref) <= 1.0


def documented_sum(x: np.ndarray, cent: np.ndarray, idx: np.ndarray, bs: int) -> np.float32:
    """One output of one row in the kernel's documented order (`kernels.pq_jit`), by hand in
    float32: each table entry by products in pairs (an odd last one last), blocks by fours."""
    f = np.float32
    dots = []
    for b, c in enumerate(idx):
        xs, cs = x[b * bs:(b + 1) * bs], cent[c]
        t = f(xs[0] * cs[0]) if bs == 1 else f(f(xs[0] * cs[0]) + f(xs[1] * cs[1]))
        for j in range(2, bs - 1, 2):
            t = f(t + f(f(xs[j] * cs[j]) + f(xs[j + 1] * cs[j + 1])))
        if bs % 2 and bs > 1:
            t = f(t + f(xs[-1] * cs[-1]))
        dots.append(t)
    y, n4 = f(0.0), len(dots) - len(dots) % 4
    for b in range(0, n4, 4):
        y = f(y + f(f(dots[b] + dots[b + 1]) + f(dots[b + 2] + dots[b + 3])))
    for b in range(n4, len(dots)):
        y = f(y + dots[b])
    return y


@pytest.mark.parametrize("inp,bs", [(40, 4), (21, 3), (6, 1), (64, 8)])
def test_sums_follow_the_documented_order_bit_for_bit(inp, bs):
    cw = codebook(3, inp, 8, bs, seed=5)
    x = torch.randn(2, inp, generator=torch.Generator().manual_seed(6))
    cent, idx = cw.centroids.float().numpy(), cw.indices().numpy()
    y = pq_jit.jit_linear(x, pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw), None)
    want = [[documented_sum(x[m].numpy(), cent, idx[n], bs) for n in range(3)] for m in range(2)]
    assert y.numpy().tolist() == want


def test_fallback_when_compiled_kernels_are_off(monkeypatch):
    cw = codebook(24, 32, 16, 8)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv(jit.ENV, "0")
    assert not pq_jit.available() and "jit" not in pq.selectable()
    y = pq_jit.jit_linear(x, pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw), None)
    assert torch.equal(y, pq_jit.jit_linear_torch(x, pq_jit.jit_centroids(cw),
                                                  pq_jit.jit_codes(cw), None))


def test_layer_runs_the_jit_form_and_follows_centroid_updates():
    cw = codebook(40, 64, 32, 8)
    layer = PQLinear(cw, torch.randn(40, generator=torch.Generator().manual_seed(3)))
    layer.set_form("jit")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert within(layer(x), pq.ref_linear(x.reshape(-1, 64), cw, layer.bias).view(2, 5, 40)) <= 1
        layer.centroids.mul_(2.0)  # in place: the version counter moves, derived state rebuilds
        y = layer(x)
    want = pq.ref_linear(x.reshape(-1, 64), layer.codebook, layer.bias).view(2, 5, 40)
    assert within(y, want) <= 1.0
    assert "pq-jit" in layer.candidates()


# the compiled gather of the ``tiled`` / ``bf16`` forms: a copy, so equal bit for bit to its twin
# (index_select); 8, 16 and 32-byte rows take the kernel, other widths the twin
GATHER_CASES = [(torch.bfloat16, 4), (torch.bfloat16, 8), (torch.bfloat16, 16),
                (torch.float32, 2), (torch.float32, 4), (torch.float32, 8),
                (torch.bfloat16, 3), (torch.float32, 3)]


@pytest.mark.parametrize("suffix", ("", "_par"))
@pytest.mark.parametrize("dtype,bs", GATHER_CASES[:6])
def test_gather_kernel_copies_rows_bit_for_bit(suffix, dtype, bs):
    g = torch.Generator().manual_seed(5)
    cent = torch.randn(256, bs, generator=g).to(dtype)
    cent[0] = float("nan")  # a payload is copied, not computed: NaN bits survive
    cent[0, 0] = torch.tensor(0x7FA1 if dtype == torch.bfloat16 else 0x7FA12345,
                              dtype=torch.int16 if dtype == torch.bfloat16 else torch.int32
                              ).view(dtype)  # a signalling NaN with a payload
    cent[1] = -0.0
    assign = torch.randint(256, (1001,), generator=g, dtype=torch.int32)
    assign[:3] = torch.tensor([0, 1, 255], dtype=torch.int32)
    out = torch.full((1001, bs), 7.0, dtype=dtype)
    rows = pq_jit.RowGather(cent, assign)
    # 8-byte rows: one int64 unit; 16-byte rows: one complex128; 32-byte rows: two
    assert rows.kernel_name == f"pq_gather{2 if bs * cent.element_size() == 32 else 1}"
    kernels = jit._tables.get(pq_jit._define_gather) or pq_jit._define_gather()
    kernels[rows.kernel_name + suffix](*rows.kernel_args(out, 0, 1001), 3)  # 3 uneven spans
    want = torch.index_select(cent, 0, assign)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits), want.view(bits))
    # a span of the assignments into a tile (what the tiled forms pass)
    part = torch.zeros(100, bs, dtype=dtype)
    kernels[rows.kernel_name + suffix](*rows.kernel_args(part, 500, 600), 2)
    assert torch.equal(part.view(bits), want[500:600].view(bits))


@pytest.mark.parametrize("dtype,bs", GATHER_CASES)
@pytest.mark.parametrize("jit_on", ("1", "0"))
def test_gather_rows_equals_index_select(monkeypatch, dtype, bs, jit_on):
    monkeypatch.setenv(jit.ENV, jit_on)
    g = torch.Generator().manual_seed(6)
    cent = torch.randn(64, bs, generator=g).to(dtype)
    assign = torch.randint(64, (40_000,), generator=g, dtype=torch.int32)  # over PARALLEL_MIN words at 16/32 bytes
    out = torch.empty(40_000, bs, dtype=dtype)
    assert pq_jit.gather_rows(cent, assign, out) is out
    assert torch.equal(out, torch.index_select(cent, 0, assign))
    # a tile's slice of the assignments (what the tiled forms pass)
    part = torch.empty(100, bs, dtype=dtype)
    pq_jit.gather_rows(cent, assign[500:600], part)
    assert torch.equal(part, cent[assign[500:600].long()])
    rows = pq_jit.RowGather(cent, assign)  # a layer's: its own output, or a span into a tile
    assert torch.equal(rows(), out.view(-1)) and rows().shape == (40_000 * bs,)
    assert torch.equal(rows(torch.empty(100, bs, dtype=dtype), 500, 600), part)
    # the widths decide whether the kernel may run; LOWBIT_JIT, per call, whether it does
    assert (rows.kernel_name is None) == (bs * cent.element_size() not in (8, 16, 32))


@pytest.mark.parametrize("form", ("tiled", "bf16"))
def test_tiled_forms_with_the_compiled_gather_match_their_twins(form):
    cw = codebook(70, 96, 256, 8)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(70, generator=torch.Generator().manual_seed(8))
    if form == "tiled":
        y = pq.tiled_linear(x, cw.centroids.float(), pq.flat_assign(cw), 70, bias, tile_rows=16)
        assert within(y, pq.ref_linear(x, cw, bias)) <= 1
    else:
        c16 = cw.centroids.to(torch.bfloat16)
        for tile in (0, 16):  # one tile (fresh weight) and several (scratch buffer)
            y = pq.bf16_linear(x, c16, pq.flat_assign(cw), 70, bias, tile_rows=tile)
            assert torch.equal(y, pq.ref_bf16_linear(x, cw, bias))
