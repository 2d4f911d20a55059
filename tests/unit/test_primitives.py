"""Numbers the primitives must keep: per-scheme SQNR budgets, range methods, constants, byte counts.

Budgets are ~0.5 dB below what the code measured when they were pinned (torch 2.13 CPU); the
measured values are in the comments. A drop below a budget is a real quality regression.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.eval.metrics import sqnr_db
from lowbit.primitives import QuantizationError, QuantizedWeight, fake_quantize, quantize_weight
from lowbit.primitives import ranges
from lowbit.primitives.affine import (MIN_RELATIVE_SCALE, as_2d, as_groups, code_range,
                                      implicit_zero_point, params_from_range)
from lowbit.spec import QuantSpec, parse_scheme

SHAPE = (256, 512)
STD = 0.02

# scheme -> minimum SQNR (dB) on the seeded Gaussian; measured value in the comment
SQNR_BUDGET_DB = {
    "w8": 42.0,  # measured 42.55
    "w4g128": 19.5,  # measured 20.01
    "w4g32": 21.6,  # measured 22.11
    "w3g128": 12.85,  # measured 13.36
    "w2g64": 6.4,  # measured 6.94
}
# range methods on 4-bit may trade a little against min-max; none may lose more than this
RANGE_METHOD_MARGIN_DB = 0.25
# Student-t (df=3) at w4g128, gain of a search over min-max, per zero-point form. Float zero
# point: min-max measured 15.41 dB, greedy 16.26, mse 15.82. Integer zero point (the default):
# min-max 15.59, greedy 15.98, mse 15.96 -- min-max itself is better, so greedy gains less and its
# budget is lower for this form (0.3 dB, not the float form's 0.5).
HEAVY_TAIL_GAIN_DB = {("greedy", ""): 0.3, ("mse", ""): 0.2,
                      ("greedy", "-zfloat"): 0.5, ("mse", "-zfloat"): 0.2}

# Greedy search defaults from Guan et al. 2019 (arXiv 1911.02079)
GREEDY_BINS = 200
GREEDY_RATIO = 0.16


def gaussian() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*SHAPE) * STD


def student_t3() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.distributions.StudentT(torch.tensor(3.0)).sample(SHAPE) * STD


def measured_sqnr(w: torch.Tensor, scheme: str) -> float:
    return sqnr_db(w, quantize_weight(w, parse_scheme(scheme), scheme).dequantize())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def w_gauss() -> torch.Tensor:
    return gaussian()


@pytest.fixture(scope="module")
def w_heavy() -> torch.Tensor:
    return student_t3()


def test_seeded_inputs_are_reproducible(w_gauss):
    assert torch.equal(gaussian(), w_gauss)
    assert w_gauss.shape == SHAPE
    assert abs(w_gauss.std().item() - STD) < 1e-3


@pytest.mark.parametrize("scheme", sorted(SQNR_BUDGET_DB))
def test_sqnr_budget(w_gauss, scheme):
    assert measured_sqnr(w_gauss, scheme) >= SQNR_BUDGET_DB[scheme]


def test_sqnr_orders_by_bits_and_group_size(w_gauss):
    db = {s: measured_sqnr(w_gauss, s) for s in ("w8", "w4g32", "w4g128", "w4", "w3g128", "w2g64")}
    assert db["w8"] > db["w4g32"] > db["w4g128"] > db["w4"] > db["w3g128"] > db["w2g64"]


@pytest.mark.parametrize("base", ["w4g128", "w4g32", "w4"])
@pytest.mark.parametrize("method", ["mse", "greedy", "p99.9"])
def test_range_methods_reach_minmax_on_gaussian(w_gauss, base, method):
    assert measured_sqnr(w_gauss, f"{base}-{method}") >= \
        measured_sqnr(w_gauss, base) - RANGE_METHOD_MARGIN_DB


@pytest.mark.parametrize("method,form", sorted(HEAVY_TAIL_GAIN_DB))
def test_search_beats_minmax_on_heavy_tails(w_heavy, method, form):
    minmax_db = measured_sqnr(w_heavy, f"w4g128{form}")
    gain = HEAVY_TAIL_GAIN_DB[(method, form)]
    assert measured_sqnr(w_heavy, f"w4g128-{method}{form}") >= minmax_db + gain


@pytest.mark.parametrize("scheme", ["w4g128", "w4g128-sym", "w3g128", "w8-asym"])
@pytest.mark.parametrize("search", [ranges.mse_search, ranges.greedy_search])
def test_searches_never_lose_to_minmax_per_group(w_heavy, scheme, search):
    """Both searches start from min-max and keep the best range seen, group by group."""
    spec = parse_scheme(scheme)
    xg = as_groups(w_heavy[:32], spec)  # (32, G, S)
    lo0, hi0 = ranges.minmax(xg)
    lo, hi = search(xg, spec)
    assert lo.shape == lo0.shape == hi.shape
    err0 = ranges._group_error(xg, lo0, hi0, spec)
    err = ranges._group_error(xg, lo, hi, spec)
    assert bool((err <= err0).all())


def test_greedy_defaults_from_the_paper():
    assert ranges.GREEDY_BINS == GREEDY_BINS
    assert ranges.GREEDY_RATIO == GREEDY_RATIO
    defaults = ranges.greedy_search.__defaults__
    assert defaults == (GREEDY_BINS, GREEDY_RATIO)


def test_mse_search_defaults():
    assert ranges.MSE_GRID_POINTS == 100
    assert ranges.MSE_MAX_SHRINK == 0.8
    assert ranges.mse_search.__defaults__ == (100, 0.8)


def test_greedy_shrinks_at_most_ratio_of_the_range(w_heavy):
    spec = parse_scheme("w4g128-greedy")
    xg = as_groups(w_heavy, spec)
    lo0, hi0 = ranges.minmax(xg)
    lo, hi = ranges.greedy_search(xg, spec)
    width0, width = hi0 - lo0, hi - lo
    steps = round(GREEDY_BINS * GREEDY_RATIO)  # 32 steps of width0 / 200
    assert bool((width >= width0 * (1 - steps / GREEDY_BINS) - 1e-6).all())
    assert bool((lo >= lo0).all() and (hi <= hi0).all())
    assert bool((width < width0).any())  # heavy tails: some groups do clip


def test_minmax_range():
    xg = torch.tensor([[[3.0, -1.0, 2.0], [0.5, 0.5, 0.5]]])  # (1, 2, 3)
    lo, hi = ranges.minmax(xg)
    assert lo.tolist() == [[-1.0, 0.5]] and hi.tolist() == [[3.0, 0.5]]


def test_percentile_range_on_a_ramp():
    xg = torch.arange(101, dtype=torch.float32).reshape(1, 1, 101)  # 0, 1, ..., 100
    lo, hi = ranges.percentile(xg, 99.0)
    assert lo.item() == pytest.approx(1.0) and hi.item() == pytest.approx(99.0)
    lo, hi = ranges.percentile(xg, 100.0)
    assert lo.item() == 0.0 and hi.item() == 100.0


def test_percentile_clips_outliers():
    x = torch.linspace(-1, 1, 1000)
    x[0], x[-1] = -50.0, 50.0
    qw = quantize_weight(x.reshape(1, -1), parse_scheme("w8-p99"), "outliers")
    assert qw.scale.item() < 50.0 / 127  # the outliers did not set the scale
    assert qw.codes().min().item() == 1 and qw.codes().max().item() == 255  # clamped, not wrapped


@pytest.mark.parametrize("bits", range(2, 9))
def test_code_range_and_zero_point(bits):
    qmax = (1 << bits) - 1
    assert code_range(QuantSpec(bits=bits, symmetric=True)) == (1, qmax)
    assert code_range(QuantSpec(bits=bits, symmetric=False)) == (0, qmax)
    assert implicit_zero_point(QuantSpec(bits=bits, symmetric=True)) == 1 << (bits - 1)


def test_symmetric_scale_formula():
    spec = parse_scheme("w4g4-sym")  # scale = amax / (2**3 - 1) = amax / 7
    scale, zp = params_from_range(torch.tensor([[-3.5]]), torch.tensor([[1.0]]), spec)
    assert zp is None and scale.dtype == torch.float16 and scale.tolist() == [[0.5]]


def test_asymmetric_scale_floor_keeps_constant_rows_exact():
    assert MIN_RELATIVE_SCALE == 2.0 ** -9
    qw = quantize_weight(torch.full((2, 64), 100.0), parse_scheme("w4"), "const")
    assert (qw.dequantize() - 100.0).abs().max().item() <= 0.05  # the documented guarantee
    assert qw.zero_point.abs().max().item() <= 512 + 15


@pytest.mark.parametrize("scheme,shape2d,groups_shape", [
    ("w8t", (6, 8), (1, 1, 48)), ("w8", (6, 8), (6, 1, 8)), ("w8r", (6, 8), (6, 1, 8)),
    ("w4g4", (6, 8), (6, 2, 4)), ("w2g2", (6, 8), (6, 4, 2)),
])
def test_as_groups_shapes(scheme, shape2d, groups_shape):
    assert as_groups(torch.zeros(shape2d), parse_scheme(scheme)).shape == groups_shape


def test_as_2d():
    assert as_2d(torch.zeros(5)).shape == (1, 5)
    assert as_2d(torch.zeros(4, 3, 2, 2)).shape == (4, 12)


# scheme -> bytes of a (256, 512) weight: codes + float16 scales (+ uint8 zero points, or float16
# ones for the -zfloat form)
NBYTES_256x512 = {
    "w8": 256 * 512 + 256 * 2,
    "w8t": 256 * 512 + 2,
    "w8r": 256 * 512 + 256 * (2 + 1),
    "w4g128": 256 * 256 + 256 * 4 * (2 + 1),
    "w4g32": 256 * 256 + 256 * 16 * (2 + 1),
    "w4g128-sym": 256 * 256 + 256 * 4 * 2,
    "w3g128": 256 * 192 + 256 * 4 * (2 + 1),  # 512 codes -> 64 units of 3 bytes
    "w2g64": 256 * 128 + 256 * 8 * (2 + 1),
    "w5": 256 * 512 + 256 * (2 + 1),  # 5..7 bits take a byte per code
    "w4g128-sfloat32": 256 * 256 + 256 * 4 * (4 + 1),
    "w4g128-zfloat": 256 * 256 + 256 * 4 * 2 * 2,
    "w8r-zfloat": 256 * 512 + 256 * 2 * 2,
    "w4g128-sfloat32-zfloat": 256 * 256 + 256 * 4 * 4 * 2,
}


@pytest.mark.parametrize("scheme", sorted(NBYTES_256x512))
def test_nbytes_accounting(w_gauss, scheme):
    qw = quantize_weight(w_gauss, parse_scheme(scheme), scheme)
    assert qw.nbytes == NBYTES_256x512[scheme]


def test_w4g128_is_under_a_seventh_of_float32(w_gauss):
    qw = quantize_weight(w_gauss, parse_scheme("w4g128"), "w")
    assert qw.nbytes / (w_gauss.numel() * 4) == pytest.approx(68608 / 524288)


def test_check_reports_mismatched_tensors(w_gauss):
    qw = quantize_weight(w_gauss[:16, :128], parse_scheme("w4g32"), "fc")
    qw.check("fc")
    bad = QuantizedWeight(qw.qdata, qw.scale.float(), qw.zero_point, qw.spec, qw.shape)
    with pytest.raises(QuantizationError, match=r"fc\.scale"):
        bad.check("fc")
    missing = QuantizedWeight(qw.qdata, qw.scale, None, qw.spec, qw.shape)
    with pytest.raises(QuantizationError, match=r"fc\.zero_point: .*missing"):
        missing.check("fc")
    short = QuantizedWeight(qw.qdata[:, :-1], qw.scale, qw.zero_point, qw.spec, qw.shape)
    with pytest.raises(QuantizationError, match=r"fc\.qdata"):
        short.check("fc")


def test_fake_quantize_equals_dequantize(w_gauss):
    spec = parse_scheme("w4g128")
    assert torch.equal(fake_quantize(w_gauss, spec), quantize_weight(w_gauss, spec).dequantize())


def test_quantize_is_deterministic(w_gauss):
    spec = parse_scheme("w3g128-greedy")
    a, b = quantize_weight(w_gauss, spec), quantize_weight(w_gauss, spec)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero_point, b.zero_point)


def test_sqnr_metric():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * torch.log10(torch.tensor(25.0)).item())


def test_percentile_per_tensor_on_a_large_layer():
    x = torch.zeros(4097, 4096)  # 16.8M elements > 2**24 in one per-tensor group
    x[0, 0] = 1.0
    try:
        qw = quantize_weight(x, parse_scheme("w8t-p99.9"), "big")
    except QuantizationError as exc:  # a loud, named refusal would also do
        assert "big" in str(exc)
        return
    assert torch.isfinite(qw.scale).all()
