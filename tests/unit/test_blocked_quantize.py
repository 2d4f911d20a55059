"""quantize_weight works block of rows by block (bounded temporaries): the codes, scales and zero
points equal those of one whole-tensor pass, and the blocked SQNR equals metrics.sqnr_db."""
import math

import pytest
import torch

import lowbit.primitives.qweight as qweight
from lowbit.primitives.metrics import sqnr_db
from lowbit.spec import parse_scheme

SCHEMES = ["w4g128", "w8", "w8r", "w4g32-sym", "w3g64", "w8-p99.9", "w4g128-mse", "w2g32", "w8t"]
SQNR_REL_TOLERANCE = 1e-12  # the same sums of squares, added in another order


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, 256, generator=g) * torch.rand(300, 1, generator=g)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_blocks_give_the_whole_tensor_result(weight, scheme, monkeypatch):
    spec = parse_scheme(scheme)
    rows_per_block = 70 if spec.range_method == "mse" else 7  # mse's grid search is slow per call
    monkeypatch.setattr(qweight, "BLOCK_ELEMENTS", 256 * rows_per_block)  # the last block short
    blocked = qweight.quantize_weight(weight, spec)
    n_blocks = 1 if spec.granularity == "tensor" else -(-300 // rows_per_block)
    assert len(qweight.row_blocks(300, 256, spec)) == n_blocks
    monkeypatch.setattr(qweight, "BLOCK_ELEMENTS", 1 << 40)
    whole = qweight.quantize_weight(weight, spec)
    assert blocked.tensors().keys() == whole.tensors().keys()
    for k, t in whole.tensors().items():
        assert torch.equal(blocked.tensors()[k], t), k
    db = qweight.weight_sqnr_db(weight, blocked)
    assert math.isclose(db, sqnr_db(weight, whole.dequantize()), rel_tol=SQNR_REL_TOLERANCE)


def test_nan_count_covers_every_block(monkeypatch):
    monkeypatch.setattr(qweight, "BLOCK_ELEMENTS", 64)
    w = torch.zeros(10, 64)
    w[1, 3] = w[8, 0] = float("nan")
    with pytest.raises(qweight.QuantizationError, match="fc: weight has 2 NaN/Inf"):
        qweight.quantize_weight(w, parse_scheme("w8"), "fc")


def test_underflow_warned_once_with_the_total(monkeypatch):
    monkeypatch.setattr(qweight, "BLOCK_ELEMENTS", 32)
    w = torch.ones(6, 32)
    w[0, 0] = w[5, 0] = 100.0  # w8 per channel, float16 scales: rows 0 and 5 are fine
    w[2:4] = 1e-30  # two rows of values below half the smallest float16 step
    with pytest.warns(UserWarning, match="2 of 6 groups") as rec:
        qweight.quantize_weight(w, parse_scheme("w8"), "fc")
    assert len([r for r in rec if "underflow" in str(r.message)]) == 1
