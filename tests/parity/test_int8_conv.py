"""Parity: `kernels.int8_conv` (static w8a8 Conv2d through oneDNN) against its float64 twin.

With unit scales and a zero zero point the kernel's float output is its int32 accumulator, which
must equal the exact integer convolution bit for bit. Otherwise the output is compared with
`ref_w8a8_static_conv2d` relative to ``max|ref|`` [worst measured here: 8.6e-8].
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import int8_conv as kc
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

pytestmark = pytest.mark.skipif(not kc.conv_available(), reason="no oneDNN int8 convolution here")

CONV_TOL = 1e-6
CONV_MIN_COSINE = 0.999  # vs the fp32 convolution on Gaussian data [0.99994]
# (batch, in, size, out, kernel, stride, padding, groups)
CASES = [(2, 16, 12, 32, 3, 1, 1, 1), (4, 1, 8, 16, 3, 1, 1, 1), (2, 16, 9, 16, 3, 2, 0, 4),
         (1, 8, 7, 8, 1, 1, 0, 1)]


@pytest.mark.parametrize("n,c,size,o,k,stride,pad,groups", CASES)
def test_static_conv_matches_reference(n, c, size, o, k, stride, pad, groups):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(o, c // groups, k, k, generator=gen) * 0.1
    x, bias = torch.randn(n, c, size, size, generator=gen), torch.randn(o, generator=gen)
    qw = quantize_weight(w, parse_scheme("w8"))
    lo, hi = x.min().item(), x.max().item()
    s, z = (hi - lo) / 255, round(-lo / ((hi - lo) / 255))
    geo = dict(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1), groups=groups)
    prepared = kc.prepare_w8a8_conv(qw.qdata, qw.scale, tuple(w.shape), s, z, **geo)
    y = kc.w8a8_static_conv2d(x, prepared, bias)
    ref = kc.ref_w8a8_static_conv2d(x, qw.qdata, qw.scale, tuple(w.shape), s, z, bias, **geo)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= CONV_TOL
    fp32 = F.conv2d(x, w, bias, stride, pad, 1, groups)
    assert F.cosine_similarity(y.flatten(1), fp32.flatten(1)).min() >= CONV_MIN_COSINE


def test_int32_accumulation_is_exact():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 32, 10, 10), generator=gen).float()  # codes with s=1, z=0
    codes = torch.randint(0, 256, (16, 32 * 9), dtype=torch.uint8, generator=gen)
    prepared = kc.prepare_w8a8_conv(codes, torch.ones(16, 1), (16, 32, 3, 3), 1.0, 0, padding=(1, 1))
    y = kc.w8a8_static_conv2d(x, prepared)
    exact = F.conv2d(x.double(), codes.double().reshape(16, 32, 3, 3) - 128, padding=1)
    assert exact.abs().max() < 2 ** 24 and torch.equal(y.double(), exact)


def test_bad_parameters_name_the_problem():
    codes = torch.zeros(4, 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="act_zero_point must be an integer in 0..255.*found 3.5"):
        kc.prepare_w8a8_conv(codes, torch.ones(4, 1), (4, 2, 3, 3), 0.1, 3.5)
    with pytest.raises(ValueError, match=r"expected 4 values .* found \(3, 1\)"):
        kc.prepare_w8a8_conv(codes, torch.ones(3, 1), (4, 2, 3, 3), 0.1, 3)
    with pytest.raises(ValueError, match=r"expected uint8 with \(4, 2, 3, 3\) elements, found \(4, 17\)"):
        kc.prepare_w8a8_conv(codes[:, :17], torch.ones(4, 1), (4, 2, 3, 3), 0.1, 3)


@pytest.mark.parametrize("shape,groups", [((16, 8, 3, 3), 1), ((8, 2, 5, 5), 4), ((4, 3, 1, 1), 1)])
def test_codes_come_back_from_the_packed_weight(shape, groups):
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(1, 256, (shape[0], shape[1] * shape[2] * shape[3]), dtype=torch.uint8,
                          generator=gen)
    prepared = kc.prepare_w8a8_conv(codes, torch.ones(shape[0], 1), shape, 0.1, 7, groups=groups)
    assert torch.equal(kc.codes_from_prepared_conv(prepared), codes)
