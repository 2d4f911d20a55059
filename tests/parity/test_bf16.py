"""Parity: `kernels.bf16` (dequantize to bf16, bf16 GEMM) against its plain-torch twin.

Bit for bit: the bf16 weight equals the fp32 path's weight rounded once to bf16, and equals
`QuantizedWeight.dequantize` rounded to bf16 with float16 scales (where the fp32 path is exact);
the whole layer equals `ref_bf16_linear`. Against the fp32 truth (`cpu.ref_linear`) the error is
bounded by bf16 rounding of activations, weight and output, relative to ``max|ref|``.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import bf16, cpu
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

# bf16_linear vs fp32 ref_linear, max|diff| / max|ref|: activations, weight and output each
# rounded to bf16 (unit roundoff 2**-9 = 0.002) [worst measured here: 0.0036, w4g128 at M=1]
BF16_PATH_TOL = 0.01
SCHEMES = ["w8", "w8-asym", "w4g128", "w4g32", "w4", "w8g64"]
SHAPES = [(384, 384), (96, 1536), (1000, 256)]  # (N, K)


def weight(n: int, k: int, scheme: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=gen) * 0.05, parse_scheme(scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_weight_is_the_fp32_weight_rounded_once(scheme, n, k, monkeypatch):
    qw = weight(n, k, scheme)
    assert bf16.bf16_supported(qw)
    scale, offset = cpu.f32_params(qw)
    want = cpu.dequant_f32(qw, scale, offset).to(torch.bfloat16)
    assert torch.equal(bf16.dequant_bf16(qw, scale, offset), want)
    monkeypatch.setattr(bf16, "CHUNK_ELEMENTS", 7 * k)  # blocks of 7 rows: a ragged last block
    assert torch.equal(bf16.dequant_bf16(qw, scale, offset), want)
    truth = qw.dequantize(torch.float32).reshape(n, k).to(torch.bfloat16)  # float16 scales: exact
    assert torch.equal(want, truth)


@pytest.mark.parametrize("scheme", ["w8", "w4g128"])
@pytest.mark.parametrize("m", [1, 13, 200])
def test_bf16_linear_equals_its_reference_and_stays_near_fp32(scheme, m):
    qw = weight(256, 1536, scheme)
    gen = torch.Generator().manual_seed(1)
    x, bias = torch.randn(m, 1536, generator=gen), torch.randn(256, generator=gen)
    scale, offset = cpu.f32_params(qw)
    y = bf16.bf16_linear(x, qw, scale, offset, bias)
    assert y.dtype == torch.float32 and y.shape == (m, 256)
    assert torch.equal(y, bf16.ref_bf16_linear(x, qw, bias))
    truth = cpu.ref_linear(x, qw, bias)
    assert ((y - truth).abs().max() / truth.abs().max()).item() <= BF16_PATH_TOL


def test_unsupported_weights_are_refused_by_the_predicate():
    assert not bf16.bf16_supported(weight(8, 64, "w8t"))      # one scale for the tensor
    assert not bf16.bf16_supported(weight(8, 64, "w3g32"))    # 3-bit codes cross bytes
    assert not bf16.bf16_supported(weight(8, 63, "w4"))       # a padded half byte per row
