"""Row-wise scale-and-bias quantization of tables (tables/quant.py): round trip, bias, error budget,
greedy vs min-max, and the fast decoder against its plain twin."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.tables.format import Layout, TableError
from lowbit.tables.quant import decode_records, decode_reference, encode_rows, quantize_rows, row_params

# |mean error| over all elements must stay below this fraction of the RMSE: rounding to nearest with
# the same scale both ways is unbiased. Cube's /2**b dequantization gives ~10% at 4 bits, 40% at 2.
MEAN_ERROR_BUDGET = 0.03
FP16_REL = 2.0 ** -11  # float16 rounds a parameter by at most half an ulp: 2**-11 relative
QUANT_BITS = (2, 4, 8)


def rows(n=2000, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 4 - 1  # uniform in [-1, 3): not centred at 0


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_round_trip_error_is_at_most_half_a_step(bits, scale_dtype):
    x = rows()
    layout = Layout(64, bits, scale_dtype)
    back = decode_reference(torch.from_numpy(quantize_rows(x, layout)), layout)
    scale, bias = row_params(x, layout, "minmax")
    slack = bias.float().abs() * (FP16_REL if scale_dtype == "float16" else 2.0 ** -24)
    bound = scale.float() / 2 + slack + 1e-6  # (n, 1)
    assert ((back - x).abs() <= bound).all()


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_no_systematic_bias(bits):
    x = rows(seed=1)
    layout = Layout(64, bits)
    records = quantize_rows(x, layout)
    err = decode_reference(torch.from_numpy(records), layout) - x
    rmse = err.square().mean().sqrt()
    assert abs(float(err.mean())) < MEAN_ERROR_BUDGET * float(rmse)
    # the Paddle Cube bug (dequantize with (max - min) / 2**b) fails this same budget
    scale, bias = row_params(x, layout, "minmax")
    codes = (decode_reference(torch.from_numpy(records), layout) - bias.float()) / scale.float()
    cube = codes * scale.float() * (2 ** bits - 1) / 2 ** bits + bias.float()
    cube_err = cube - x
    assert abs(float(cube_err.mean())) > MEAN_ERROR_BUDGET * float(cube_err.square().mean().sqrt())


@pytest.mark.parametrize("bits", [2, 4])
def test_greedy_range_beats_minmax(bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 64, generator=g)  # Gaussian rows: outliers make min-max wasteful
    layout = Layout(64, bits)
    errs = {}
    for method in ("minmax", "greedy"):
        _, back = encode_rows(x, layout, method)
        errs[method] = float((back - x).square().mean())
    assert errs["greedy"] < 0.95 * errs["minmax"]


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("dim", [64, 5])
def test_fast_decoder_matches_reference_bit_exactly(bits, dim):
    x = rows(300, dim, seed=3)
    layout = Layout(dim, bits)
    records, back = encode_rows(x, layout)
    fast = decode_records(records[::3], layout)  # a strided gather, as a lookup would produce
    ref = decode_reference(torch.from_numpy(records[::3].copy()), layout).numpy()
    assert fast.dtype == np.float32 and np.array_equal(fast, ref)
    assert np.array_equal(back.numpy(), decode_reference(torch.from_numpy(records), layout).numpy())


def test_four_bit_rows_take_at_most_016_of_fp32():
    layout = Layout(64, 4)
    assert layout.record_bytes == 36 and layout.record_bytes / (64 * 4) <= 0.16


def test_constant_and_raw_rows():
    x = torch.tensor([[100.0] * 8, [0.0] * 8, [-3.5] * 8])
    for bits in QUANT_BITS:
        layout = Layout(8, bits)
        back = decode_reference(torch.from_numpy(quantize_rows(x, layout)), layout)
        assert torch.allclose(back, x, atol=100 * FP16_REL)
    assert torch.equal(decode_reference(torch.from_numpy(quantize_rows(x, Layout(8, 32))), Layout(8, 32)), x)


@pytest.mark.parametrize("value, bits, msg", [(float("nan"), 4, "NaN"), (float("inf"), 8, "NaN"),
                                              (1e6, 16, "overflows float16"),
                                              (1e6, 4, "overflows float16 scale/bias")])
def test_bad_rows_are_named(value, bits, msg):
    x = torch.zeros(4, 8)
    x[2, 3] = value
    with pytest.raises(TableError, match=f"row 12 .*{msg}"):
        quantize_rows(x, Layout(8, bits), first_key=10)


def test_layout_validation_lists_valid_forms():
    with pytest.raises(TableError, match=r"bits must be one of \(2, 4, 8, 16, 32\)"):
        Layout(64, 3)
