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
# relative to the output's largest magnitude [worst measured here: 4.7e-7 of it]
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


@pytest.mark.parametrize("out,inp,k,bs", [(48, 64, 16, 8), (70, 96, 256, 4), (33, 40, 300, 8),
                                          (16, 16, 2, 16), (130, 384, 256, 8)])
@pytest.mark.parametrize("m", (1, 5, 64))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference_and_twin(out, inp, k, bs, m, with_bias, variant):
    cw = codebook(out, inp, k, bs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, inp, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    cent_t, codes_t = pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw)
    assert codes_t.dtype == (torch.uint8 if k <= 256 else torch.int32)
    b = np.zeros(out, np.float32) if bias is None else bias.numpy()
    tasks = 3  # uneven spans: 3 does not divide 16, 33, 48, 70, 130
    y = torch.from_numpy(table()[variant](x.numpy(), cent_t.numpy(), codes_t.numpy(), b, tasks))
    ref = pq.ref_linear(x, cw, bias)
    assert y.shape == ref.shape
    assert within(y, ref) <= 1.0
    assert within(pq_jit.jit_linear_torch(x, cent_t, codes_t, bias), ref) <= 1.0


def test_blocks_are_summed_in_order_bit_for_bit():
    """One output, one row: y = sum over blocks in order of the per-block dot products (each
    summed over j in order), computed here by hand in float32 with numpy."""
    cw = codebook(1, 40, 8, 4, seed=5)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(6))
    cent = cw.centroids.float().numpy()
    idx = cw.indices()[0].numpy()
    want = np.float32(0.0)
    for b, c in enumerate(idx):
        dot = np.float32(x[0, 4 * b].item()) * cent[c, 0]
        for j in range(1, 4):
            dot = np.float32(dot + np.float32(x[0, 4 * b + j].item()) * cent[c, j])
        want = np.float32(want + dot)
    y = pq_jit.jit_linear(x, pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw), None)
    assert y.item() == want


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
