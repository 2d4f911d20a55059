"""Parity: `kernels.int8_dynamic` (w8a8 dynamic and static) against its plain-torch twins.

Integers are compared bit for bit (activation codes, per-token parameters, the int32 product).
Float outputs: the reference does the integer product and the epilogue in float64; the kernel runs
its epilogue in float32, where ``acc - z_x * col_sum`` cancels most of two large terms, so the
budget is elementwise, in float32 roundings of the terms' magnitudes:
``|y - ref| <= EPILOGUE_ULPS * F32_U * ((|acc| + |z_x * col_sum|) * s_x * s_w + |bias|)``
(a cast, a product, a difference and two scalings: about 5 roundings at first order). In brackets:
the worst case measured over this file's seeded cases (torch 2.13 CPU, AMD EPYC).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import int8_dynamic as k8
from lowbit.primitives import quantize_weight
from lowbit.primitives.affine import params_from_range, quantize_codes
from lowbit.primitives.tokens import ACT_SPEC, token_params, token_range
from lowbit.spec import parse_scheme

F32_U = 2.0 ** -24
EPILOGUE_ULPS = 5    # dynamic [2.78], static [2.48]
# Quality on Gaussian data (weights N(0, 0.05), activations N(0, 1) with one feature x20): least
# per-row cosine of the output vs the fp32 layer; dynamic [0.99929], static with one range over
# the whole tensor [0.99554]: the outlier feature costs the per-tensor grid resolution.
DYNAMIC_MIN_COSINE = 0.999
STATIC_MIN_COSINE = 0.99
SHAPES = [(1, 384, 384), (7, 100, 30), (64, 384, 1536), (33, 1536, 48), (5, 17, 3)]  # (M, K, N)


def layer(m: int, k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen)
    x[:, 0] *= 20.0  # an outlier feature, as transformer activations have
    bias = torch.randn(n, generator=gen)
    return x, w, bias, quantize_weight(w, parse_scheme("w8"))


def epilogue_ulps(y, ref, q, qw, s_x, z_x, bias) -> float:
    """Largest |y - ref| in units of F32_U times the epilogue's term magnitudes (see top)."""
    w = qw.qdata.double() - 128.0  # (N, K)
    acc = q.double() @ w.t()
    mag = (acc.abs() + (z_x.double() * w.sum(1)).abs()) * s_x.double() * qw.scale.double().t()
    mag = mag + (0.0 if bias is None else bias.double().abs())
    return ((y.double() - ref.double()).abs() / (F32_U * mag)).max().item()


def test_token_params_equal_primitives_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=gen) * torch.logspace(-6, 6, 40).unsqueeze(1)
    x[0] = 0.0          # all-zero row: the smallest scale, zero point 0
    x[1] = 100.0        # constant row: the relative floor keeps the zero point bounded
    x[2] = x[2].abs() + 3.0  # all positive
    x[3] = -x[3].abs() - 3.0  # all negative
    lo, hi = token_range(x)
    scale, zp = token_params(lo, hi)
    want_scale, want_zp = params_from_range(lo, hi, ACT_SPEC)
    assert torch.equal(scale, want_scale) and torch.equal(zp, want_zp)
    assert scale.dtype == zp.dtype == torch.float32


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_codes_and_int32_product_are_exact(m, k, n):
    x, _, _, qw = layer(m, k, n)
    q, s, z = k8.quantize_tokens(x)
    want_s, want_z = params_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), ACT_SPEC)
    want_q = quantize_codes(x.unsqueeze(1), want_s, want_z, ACT_SPEC).view(m, k)  # (M, 1, K) -> (M, K)
    assert torch.equal(q, want_q) and torch.equal(s, want_s) and torch.equal(z, want_z)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    acc = torch._int_mm(q, prepared["weight"].t())
    exact = q.long() @ (qw.qdata.long() - 128).t()
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact)
    assert torch.equal(prepared["col_sum"].long(), (qw.qdata.long() - 128).sum(1))


def test_clamp_free_token_codes_equal_primitives_bit_for_bit():
    """`token_codes` skips the clamp (rows on their own grids): adversarial rows where the two
    float roundings are largest (offset rows at the 2**-9 relative floor, wide magnitudes,
    constant, zero, one-hot, NaN) give the same codes as `quantize_codes`."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 96, generator=gen) * torch.logspace(-30, 30, 400).unsqueeze(1)
    x[:100] = 1000.0 + torch.rand(100, 96, generator=gen) * torch.logspace(-6, 3, 100).unsqueeze(1)
    x[100:150] = -x[100:150].abs() - torch.logspace(-3, 3, 50).unsqueeze(1)
    x[150] = 0.0
    x[151] = -7.25
    x[152] = 0.0
    x[152, 5] = 3.0
    x[153, 7] = float("nan")
    lo, hi = token_range(x)
    s, z = token_params(lo, hi)
    want = quantize_codes(x.unsqueeze(1), s, z, ACT_SPEC).view(x.shape)  # (M, 1, K) -> (M, K)
    got = k8.token_codes(x, s, z)
    assert torch.equal(got, want)
    assert int(got[154:].min()) == 0 and int(got[154:].max()) == 255  # the grid's ends are reached


@pytest.mark.parametrize("block", [100, 1 << 30])  # row blocks of 1..few rows, or one piece
def test_codes_in_row_blocks_equal_codes_in_one_piece(block, monkeypatch):
    x, _, _, _ = layer(37, 100, 4)
    s, z = params_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), ACT_SPEC)
    want = quantize_codes(x.unsqueeze(1), s, z, ACT_SPEC).view(37, 100)  # (M, 1, K) -> (M, K)
    want_static = quantize_codes(x.reshape(1, 1, -1), torch.tensor([[0.02]]), torch.tensor([[99.5]]),
                                 ACT_SPEC).view(37, 100)
    monkeypatch.setattr(k8, "QUANT_BLOCK", block)
    assert torch.equal(k8.quantize_tokens(x)[0], want)
    assert torch.equal(k8.quantize_static(x, 0.02, 99.5), want_static)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_dynamic_matches_reference(m, k, n, with_bias):
    x, w, bias, qw = layer(m, k, n)
    bias = bias if with_bias else None
    y = k8.w8a8_linear(x, k8.prepare_w8a8(qw.qdata, qw.scale), bias)
    ref = k8.ref_w8a8_linear(x, qw.qdata, qw.scale, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    q, s_x, z_x = k8.quantize_tokens(x)
    assert epilogue_ulps(y, ref, q, qw, s_x, z_x, bias) <= EPILOGUE_ULPS
    assert F.cosine_similarity(y, F.linear(x, w, bias), dim=1).min() >= DYNAMIC_MIN_COSINE


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_static_matches_reference(m, k, n):
    x, w, bias, qw = layer(m, k, n)
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / 255
    zp = -lo / scale
    y = k8.w8a8_static_linear(x, k8.prepare_w8a8(qw.qdata, qw.scale), scale, zp, bias)
    ref = k8.ref_w8a8_static_linear(x, qw.qdata, qw.scale, scale, zp, bias)
    q, s_x, z_x = k8.quantize_static(x, scale, zp), torch.tensor([[scale]]), torch.tensor([[zp]])
    assert epilogue_ulps(y, ref, q, qw, s_x, z_x, bias) <= EPILOGUE_ULPS
    assert F.cosine_similarity(y, F.linear(x, w, bias), dim=1).min() >= STATIC_MIN_COSINE


def test_static_clamps_values_outside_the_calibrated_range_like_the_reference():
    x, _, bias, qw = layer(16, 64, 32)
    y = k8.w8a8_static_linear(x * 10, k8.prepare_w8a8(qw.qdata, qw.scale), 0.01, 128.0, bias)
    ref = k8.ref_w8a8_static_linear(x * 10, qw.qdata, qw.scale, 0.01, 128.0, bias)
    q = k8.quantize_static(x * 10, 0.01, 128.0)
    s_x, z_x = torch.tensor([[0.01]]), torch.tensor([[128.0]])
    assert epilogue_ulps(y, ref, q, qw, s_x, z_x, bias) <= EPILOGUE_ULPS
    assert q.min().item() == 0 and q.max().item() == 255  # clamped at both ends


def test_zero_rows_give_the_bias_exactly_and_empty_input_works():
    _, _, bias, qw = layer(1, 64, 32)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    assert torch.equal(k8.w8a8_linear(torch.zeros(3, 64), prepared, bias), bias.expand(3, -1))
    assert k8.w8a8_linear(torch.zeros(0, 64), prepared, bias).shape == (0, 32)


def test_bad_inputs_name_the_problem():
    _, _, _, qw = layer(1, 64, 32)
    with pytest.raises(ValueError, match=r"uint8 tensor \(N, K\), found \(32, 64\) torch.int8"):
        k8.prepare_w8a8(qw.qdata.to(torch.int8), qw.scale)
    with pytest.raises(ValueError, match=r"expected \(32, 1\) .* found \(16, 1\)"):
        k8.prepare_w8a8(qw.qdata, qw.scale[:16])
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    with pytest.raises(ValueError, match="act_scale must be a positive finite float, found 0.0"):
        k8.w8a8_static_linear(torch.ones(2, 64), prepared, 0.0, 128.0)


def test_codes_come_back_from_the_kernel_form():
    _, _, _, qw = layer(1, 100, 30)
    assert torch.equal(k8.codes_from_prepared(k8.prepare_w8a8(qw.qdata, qw.scale)), qw.qdata)


def test_static_parameters_as_tensors_give_the_same_bits_as_floats():
    x, _, bias, qw = layer(9, 64, 16)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    as_floats = k8.w8a8_static_linear(x, prepared, 0.03, 120.25, bias)
    as_tensors = k8.w8a8_static_linear(x, prepared, torch.tensor([0.03]), torch.tensor([[120.25]]), bias)
    assert torch.equal(as_floats, as_tensors)


def test_non_contiguous_and_bf16_inputs():
    x, _, bias, qw = layer(12, 64, 16)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    assert torch.equal(k8.w8a8_linear(xt, prepared, bias), k8.w8a8_linear(x, prepared, bias))
    xb = x.bfloat16()
    assert torch.equal(k8.w8a8_linear(xb, prepared, bias), k8.w8a8_linear(xb.float(), prepared, bias))
