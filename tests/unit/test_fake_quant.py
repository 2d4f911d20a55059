"""STE and LSQ fake quantization: forward equals the primitives', gradients by hand and by finite
differences."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.algorithms.fake_quant import (fake_quantize_ste, init_step, lsq_fake_quantize,
                                          lsq_grad_scale, positive_levels, qparams, stored_step)
from lowbit.primitives import QuantizationError, fake_quantize, quantize_weight
from lowbit.spec import QuantSpec, parse_scheme

SCHEMES = ("w8", "w4g32", "w4g32-sym", "w3g64", "w2", "w2g32", "w8t", "w4-mse", "w4r")
# finite-difference step and tolerance for the LSQ surrogate (float64 reference)
FD_EPS = 1e-4
FD_TOL = 2e-4


def gaussian(shape=(16, 128), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ste_forward_equals_primitives_fake_quantize(scheme):
    w = gaussian()
    spec = parse_scheme(scheme)
    assert torch.equal(fake_quantize_ste(w, spec), fake_quantize(w, spec))


@pytest.mark.parametrize("scheme", ("w4g32", "w2", "w8"))
def test_lsq_forward_at_init_equals_primitives(scheme):
    """The initial step is the primitives' scale, so LSQ starts where PTQ is."""
    w = gaussian(seed=1)
    spec = parse_scheme(scheme)
    step, zp = init_step(w, spec)
    assert torch.equal(lsq_fake_quantize(w, step, spec, zp), fake_quantize(w, spec))
    qw = quantize_weight(w, spec)
    assert torch.equal(stored_step(step, spec), qw.scale)


def hand_case():
    # symmetric 4-bit: codes [1, 15], zero point 8; scale 0.125 (exact in float16)
    spec = QuantSpec(bits=4, symmetric=True, granularity="tensor")
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 0.875, -0.9, 0.3]])
    scale = torch.tensor([[0.125]], dtype=torch.float16)
    return spec, w, scale


def test_ste_gradient_by_hand():
    spec, w, scale = hand_case()
    w.requires_grad_(True)
    out = fake_quantize_ste(w, spec, scale)
    # v = w/0.125 + 8 = [0, 8, 12, 24, 15, 0.8, 10.4] -> codes clamp(round) = [1, 8, 12, 15, 15, 1, 10]
    assert out.detach().tolist() == [[-0.875, 0.0, 0.5, 0.875, 0.875, -0.875, 0.25]]
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]))
    # inside iff the clamp keeps round(v): 0.5 <= v < 15.5; -1 (v=0) and 2 (v=24) are clipped,
    # -0.9 (v=0.8, rounds to qmin) is not
    assert w.grad.tolist() == [[0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0]]


def test_lsq_step_gradient_by_hand():
    spec, w, scale = hand_case()
    step = scale.float().clone().requires_grad_(True)
    out = lsq_fake_quantize(w, step, spec, grad_scale=1.0)
    out.sum().backward()
    v = w / 0.125 + 8
    codes = torch.tensor([[1.0, 8, 12, 15, 15, 1, 10]])
    # inside: codes - v; below: qmin - z = -7; above: qmax - z = 7
    expect = [-7.0, 8 - 8.0, 12 - 12.0, 7.0, 15 - 15.0, -7.0, 10 - 10.4]
    assert step.grad.item() == pytest.approx(sum(expect), abs=1e-5)
    assert torch.allclose(codes, torch.round(v).clamp(1, 15))


def surrogate(w: torch.Tensor, s: float, delta: torch.Tensor, z: float, qmin: int, qmax: int):
    """LSQ's w_hat(s) with round(v) replaced by v + delta (delta frozen at the evaluation point):
    its exact derivative is the LSQ gradient."""
    v = w / s + z
    inside = (v >= qmin) & (v <= qmax)
    q = torch.where(inside, v + delta, v.clamp(qmin, qmax))
    return (q - z) * s


@pytest.mark.parametrize("bits,symmetric", ((4, True), (2, False), (3, False)))
def test_lsq_step_gradient_matches_finite_difference(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", scale_dtype="float32")
    w = gaussian((3, 64), seed=2)
    step, zp = init_step(w, spec)
    step = (step * 0.7).requires_grad_(True)  # shrink so that some weights are clipped
    g_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    lsq_fake_quantize(w, step, spec, zp, grad_scale=1.0).backward(g_out)
    z = 2.0 ** (bits - 1) if symmetric else zp.double()  # (3, 1) when asymmetric
    qmin, qmax = (1 if symmetric else 0), (1 << bits) - 1
    wd, gd = w.double(), g_out.double()
    for r in range(3):
        s0 = step[r, 0].item()
        zr = z if symmetric else z[r, 0].item()
        v0 = wd[r] / s0 + zr
        delta = torch.round(v0) - v0
        f = lambda s: (surrogate(wd[r], s, delta, zr, qmin, qmax) * gd[r]).sum().item()
        fd = (f(s0 + FD_EPS * s0) - f(s0 - FD_EPS * s0)) / (2 * FD_EPS * s0)
        assert step.grad[r, 0].item() == pytest.approx(fd, abs=FD_TOL * max(1.0, abs(fd)))
    assert (torch.round(w / step.detach() + (z if symmetric else zp.float())) > qmax).any() or \
        (torch.round(w / step.detach() + (z if symmetric else zp.float())) < qmin).any()


def test_lsq_weight_gradient_uses_the_papers_range():
    """LSQ passes w's gradient where qmin <= v <= qmax (the paper's -Q_N <= v/s <= Q_P)."""
    spec, w, scale = hand_case()
    w.requires_grad_(True)
    lsq_fake_quantize(w, scale.float(), spec, grad_scale=1.0).sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]]


def test_lsq_grad_scale_follows_the_paper():
    """g = 1/sqrt(N * Q_P); the default applied to the step gradient."""
    assert positive_levels(parse_scheme("w4g32-sym")) == 7
    assert positive_levels(parse_scheme("w4g32")) == 15
    assert lsq_grad_scale(parse_scheme("w2g32"), 32) == 1.0 / math.sqrt(32 * 3)
    spec = parse_scheme("w4g32")
    w = gaussian((4, 64), seed=4)
    step, zp = init_step(w, spec)
    s1, s2 = step.clone().requires_grad_(True), step.clone().requires_grad_(True)
    lsq_fake_quantize(w, s1, spec, zp, grad_scale=1.0).square().sum().backward()
    lsq_fake_quantize(w, s2, spec, zp).square().sum().backward()
    assert torch.allclose(s2.grad, s1.grad / math.sqrt(32 * 15), rtol=1e-6, atol=0)


def test_lsq_rejects_wrong_step_shape_and_zero_point():
    spec = parse_scheme("w4g32")
    w = gaussian((4, 64))
    step, zp = init_step(w, spec)
    with pytest.raises(QuantizationError, match=r"step shape \(4, 1\).*\(4, 2\)"):
        lsq_fake_quantize(w, step[:, :1], spec, zp)
    with pytest.raises(QuantizationError, match="zero point"):
        lsq_fake_quantize(w, step, spec, None)


def test_qparams_rejects_nan():
    w = gaussian()
    w[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="layer.x: weight has NaN"):
        qparams(w, parse_scheme("w4g32"), "layer.x")
