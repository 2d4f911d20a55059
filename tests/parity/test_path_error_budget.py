"""Every compute path a quantized Linear is offered keeps its own arithmetic error small next to
the error the weight's quantization already made, so the selector may pick any of them by speed.

Error of a path = ||y_path - y_exact|| (y_exact: `cpu.ref_linear`, the codes dequantized and
multiplied in fp32); error of the weight = ||y_exact - y_float|| (the float layer). The two add
in quadrature, so a path at ratio r makes the layer's squared output error (1 + r^2) times the
weight's own. The bf16 paths (``bf16``, ``int8mm``, ``int4mm``: bf16 activations, bf16 weight or
scales) round to 8 significant bits, about as fine as an 8-bit grid's step near the row's
maximum: at 8 bits they cost a visible share, at 4 bits almost nothing. On all-MiniLM-L6-v2 the
bf16 path lowered GPTQ `w8` from 0.99978 to 0.99976 mean cosine and `w8g128` from 0.99990 to
0.99989 (BENCHMARKS.md). ``set_path("ref")`` on a layer gives fp32 arithmetic (as does
``LOWBIT_KERNEL=f32`` for the layers that offer ``f32``: 8-bit per channel, 4-bit groups).
Layers: seeded Gaussian weights with 4 outlier input columns (x8), inputs scaled 0.5..2 by column;
the GPTQ rows use a correlated-input Hessian, whose weights leave a smaller output error (a
larger ratio).
"""
from __future__ import annotations

import pytest
import torch

from lowbit.algorithms import gptq
from lowbit.nn.qlinear import QLinear
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

# path error / weight error, per bit width [measured here: 8-bit RTN 0.11-0.27, GPTQ 0.18-0.34;
# 4-bit RTN and GPTQ <= 0.05]
PATH_ERROR_BUDGET = {8: 0.5, 4: 0.1}
SCHEMES = ["w8", "w8g128", "w8-asym", "w4g128", "w4g32", "w4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(384, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 384, generator=g) * 0.05)
        lin.weight[:, :4] *= 8.0  # outlier input columns
    mix = torch.randn(384, 384, generator=g) / 384 ** 0.5 + 0.5 * torch.eye(384)
    x = (torch.randn(1024, 384, generator=g) @ mix) * torch.linspace(0.5, 2.0, 384)  # (1024, 384)
    return lin, x


def ratios(lin: torch.nn.Linear, qw, x: torch.Tensor) -> dict[str, float]:
    q = QLinear.from_float(lin, qw)
    with torch.no_grad():
        q.set_path("ref")
        exact = q(x)
        weight_err = (exact - lin(x)).norm().item()
        out = {}
        for path in q._available:
            q.set_path(path)
            out[path] = (q(x) - exact).norm().item() / weight_err
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_offered_path_is_within_the_budget(layer, scheme, method):
    lin, x = layer
    spec = parse_scheme(scheme)
    w = lin.weight.detach()
    qw = gptq(w, x.T @ x / x.shape[0], spec) if method == "gptq" else quantize_weight(w, spec)
    got = ratios(lin, qw, x)
    assert any(p != "f32" for p in got)  # a bf16-based path is offered and measured
    assert max(got.values()) < PATH_ERROR_BUDGET[spec.bits], got
    assert got.get("f32", 0.0) < 1e-3  # the fp32 path is the reference's arithmetic
