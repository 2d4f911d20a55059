"""PQ forward forms against their reference twin (dequantize + F.linear)."""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import pq
from lowbit.primitives.codebook import CodebookWeight, pack_assignments

# float32 forms sum in another order than the reference GEMM: error relative to the output scale
PQ_FORM_RTOL = 1e-5
PQ_FORM_ATOL = 1e-5
# bf16 form vs its bf16 twin (same bf16 weight and activations; the GEMM may tile differently):
# error relative to the output's largest magnitude, one bf16 rounding of the output
PQ_BF16_TWIN_RTOL = 1e-2


def codebook(out: int, inp: int, k: int, bs: int, seed: int = 0) -> CodebookWeight:
    g = torch.Generator().manual_seed(seed)
    cent = (torch.randn(k, bs, generator=g) * 0.05).half()
    a = torch.randint(k, (out, inp // bs), generator=g)  # (out, n_blocks)
    return CodebookWeight(cent, pack_assignments(a, k), (out, inp), bs)


def forms(cw: CodebookWeight, x: torch.Tensor, bias: torch.Tensor | None, tile_rows: int):
    cent = cw.centroids.float()
    return {"cached": pq.cached_linear(x, pq.reconstruct(cw), bias),
            "gather": pq.gather_linear(x, cent, pq.gather_index(cw), bias),
            "tiled": pq.tiled_linear(x, cent, pq.flat_assign(cw), cw.rows, bias, tile_rows),
            "lut": pq.lut_linear(x, cent, pq.lut_index(cw), pq.lut_bags(cw), bias),
            "lutg": pq.lutg_linear(x, cent, pq.lutg_index(cw), bias)}


@pytest.mark.parametrize("out,inp,k,bs,tile", [(48, 64, 16, 8, 0), (70, 96, 256, 4, 16),
                                               (33, 40, 300, 8, 7), (16, 16, 2, 16, 5)])
@pytest.mark.parametrize("m", (1, 5, 64))
@pytest.mark.parametrize("with_bias", (False, True))
def test_forms_match_reference(out, inp, k, bs, tile, m, with_bias):
    cw = codebook(out, inp, k, bs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, inp, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    ref = pq.ref_linear(x, cw, bias)
    scale = ref.abs().max().item()
    for name, y in forms(cw, x, bias, tile).items():
        assert y.shape == ref.shape, name
        err = (y - ref).abs().max().item()
        assert err <= PQ_FORM_ATOL + PQ_FORM_RTOL * scale, f"{name}: max error {err:.3g}"


def test_cached_and_gather_equal_reference_exactly_on_one_row():
    """Same weight, same GEMM: bit for bit."""
    cw = codebook(64, 128, 32, 8)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    ref = pq.ref_linear(x, cw, None)
    assert torch.equal(pq.cached_linear(x, pq.reconstruct(cw), None), ref)
    assert torch.equal(pq.gather_linear(x, cw.centroids.float(), pq.gather_index(cw), None), ref)


def test_gather_form_is_differentiable_in_the_centroids():
    cw = codebook(8, 16, 4, 4)
    cent = cw.centroids.float().requires_grad_(True)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    pq.gather_linear(x, cent, pq.gather_index(cw), None).sum().backward()
    # d/dC[c] = sum over (row o, block j) with a[o, j] = c of the input block x[:, j] summed over M
    idx = cw.indices()
    xs = x.sum(0).view(-1, 4)  # (n_blocks, block)
    want = torch.zeros(4, 4)
    for o in range(8):
        for j in range(4):
            want[idx[o, j]] += xs[j]
    assert torch.allclose(cent.grad, want, atol=1e-6)


@pytest.mark.parametrize("out,inp,k,bs,tile", [(48, 64, 16, 8, 0), (70, 96, 256, 4, 16),
                                               (33, 40, 300, 8, 7)])
@pytest.mark.parametrize("m", (1, 5, 64))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("compiled", (False, True))  # bf16 / bf16-jit (the twin where numba is off)
def test_bf16_form_matches_its_bf16_reference(out, inp, k, bs, tile, m, with_bias, compiled):
    cw = codebook(out, inp, k, bs)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, inp, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    ref = pq.ref_bf16_linear(x, cw, bias)
    y = pq.bf16_linear(x, cw.centroids.to(torch.bfloat16), pq.flat_assign(cw), out, bias, tile,
                       compiled=compiled)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y - ref).abs().max().item()
    assert err <= PQ_BF16_TWIN_RTOL * ref.abs().max().item(), f"max error {err:.3g}"


def test_bf16_weight_is_the_reference_weight_rounded_once():
    """The gathered bf16 weight equals the fp32 reference weight cast to bf16, bit for bit."""
    cw = codebook(24, 32, 16, 8)
    w = torch.index_select(cw.centroids.to(torch.bfloat16), 0, pq.flat_assign(cw)).view(24, 32)
    assert torch.equal(w, pq.reconstruct(cw).to(torch.bfloat16))


def test_lut_index_and_bags_address_the_table():
    """Hand-made: 2 outputs, 2 blocks, k = 3: index j * k + a[o, j], bags at o * n_blocks."""
    a = torch.tensor([[2, 0], [1, 1]])
    cw = CodebookWeight(torch.zeros(3, 2, dtype=torch.float16), pack_assignments(a, 3), (2, 4), 2)
    assert pq.lut_index(cw).tolist() == [2, 3, 1, 4]
    assert pq.lut_bags(cw).tolist() == [0, 2]
    assert pq.lut_index(cw).dtype == pq.lut_bags(cw).dtype == torch.int32
    assert pq.lutg_index(cw).tolist() == [[2, 1], [0, 1]]  # (n_blocks, out)
