"""lowbit.qat: prepare swaps in fake-quant twins holding the same Parameters, convert makes exactly
the layers post-training quantization makes (same codes, scales and outputs for the same ranges),
and the converted model saves and loads as usual."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import QuantizationError, RecipeError
from lowbit.nn import QLinear
from lowbit.nn.fake import FakeQuantLinear


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10))


def x() -> torch.Tensor:
    return torch.randn(9, 64, generator=torch.Generator().manual_seed(1))


def test_prepare_plans_like_quantize_and_shares_parameters():
    m = mlp()
    w0 = m[0].weight
    q = lowbit.qat.prepare(m, "w4g32")
    assert isinstance(q[0], FakeQuantLinear) and isinstance(q[2], FakeQuantLinear)
    assert type(q[4]) is torch.nn.Linear  # the output head, as quantize skips it
    assert q[0].weight is w0
    with pytest.raises(RecipeError, match="already has fake-quantized layers"):
        lowbit.qat.prepare(q, "w4g32")
    with pytest.raises(RecipeError, match="match no module"):
        lowbit.qat.prepare(mlp(), "w4", targets=["linear"])


@pytest.mark.parametrize("scheme", ("w4g32", "w8", "w2"))
def test_convert_equals_post_training_quantization(scheme):
    ptq = lowbit.quantize(mlp(), scheme, verbose=False)
    q = lowbit.qat.convert(lowbit.qat.prepare(mlp(), scheme))
    for i in (0, 2):
        assert isinstance(q[i], QLinear) and q[i].method == "qat"
        assert torch.equal(q[i].qdata, ptq[i].qdata) and torch.equal(q[i].scale, ptq[i].scale)
    with torch.no_grad():
        assert torch.equal(q(x()), ptq(x()))


@pytest.mark.parametrize("learn_scale", (False, True))
def test_trained_convert_matches_the_fake_forward_and_round_trips(tmp_path, learn_scale):
    q = lowbit.qat.prepare(mlp(), "w4g32", learn_scale=learn_scale)
    if not learn_scale:
        assert lowbit.qat.freeze_ranges(q) == 2
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        q(x()).square().mean().backward()
        opt.step()
    fake_w = {i: q[i].fake_weight().detach() for i in (0, 2)}
    lowbit.qat.convert(q)
    for i in (0, 2):
        assert torch.equal(q[i].dequantized_weight(), fake_w[i])
        assert q[i].method == ("lsq" if learn_scale else "qat")
    back = lowbit.load(lowbit.save(q, tmp_path / "q.safetensors"), mlp())
    with torch.no_grad():
        assert torch.equal(back(x()), q(x()))


def test_convert_needs_fake_layers_and_quantize_refuses_trained_methods():
    with pytest.raises(QuantizationError, match="no fake-quantized layers"):
        lowbit.qat.convert(mlp())
    m = mlp()
    with pytest.raises(QuantizationError, match="'qat' takes its weights from training"):
        lowbit.quantize(m, "w4", method="qat", verbose=False)
    assert type(m[0]) is torch.nn.Linear


def test_shared_layer_stays_shared_through_prepare_and_convert():
    m = mlp()
    m[2] = m[0]
    lowbit.qat.prepare(m, "w8", targets=["0", "2"])
    assert m[0] is m[2] and isinstance(m[0], FakeQuantLinear)
    lowbit.qat.convert(m)
    assert m[0] is m[2] and isinstance(m[0], QLinear)
