"""PQLinear: every form matches the reference, derived state follows loads and centroid updates,
its tensors carry the codebook's own names."""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import pq
from lowbit.nn.pq import PQLinear
from lowbit.primitives.codebook import CodebookWeight, pack_assignments, quantize_codebook

# float32 forms sum in another order than the reference GEMM
PQ_FORM_RTOL = 1e-5


def codebook(out=48, inp=64, k=16, bs=8, seed=0) -> CodebookWeight:
    g = torch.Generator().manual_seed(seed)
    cent = (torch.randn(k, bs, generator=g) * 0.05).half()
    return CodebookWeight(cent, pack_assignments(torch.randint(k, (out, inp // bs), generator=g), k),
                          (out, inp), bs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= PQ_FORM_RTOL * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("form", (None, "cached", "gather", "tiled", "lut", "ref"))
@pytest.mark.parametrize("m", (1, 7))
def test_forms_match_reference(form, m):
    cw = codebook()
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1))
    layer = PQLinear(cw, bias)
    layer.set_form(form)
    x = torch.randn(2, m, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, m, 48)
    assert close(y, pq.ref_linear(x.reshape(-1, 64), cw, bias).reshape(2, m, 48))


def test_derived_state_follows_load_state_dict():
    a, b = PQLinear(codebook(seed=0), cache=True), PQLinear(codebook(seed=5), cache=True)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for form in ("cached", "lut", "tiled"):
            a.set_form(form)
            a(x)  # build a's derived state before the load
        a.load_state_dict(b.state_dict())
        for form in ("cached", "lut", "tiled"):
            a.set_form(form), b.set_form(form)
            assert close(a(x), b(x)), form


def test_centroid_finetuning_reaches_the_cached_weight():
    layer = PQLinear(codebook(), cache=True)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = layer(x)
    layer.train_centroids(True)
    opt = torch.optim.SGD([layer.centroids], lr=0.5)
    layer(x).square().sum().backward()  # grad enabled: the gather form
    assert layer.centroids.grad is not None
    opt.step()
    with torch.no_grad():
        after = layer(x)  # the cached form, rebuilt from the updated centroids
    assert not close(after, before)
    assert close(after, pq.ref_linear(x, layer.codebook, None))


def test_tensors_and_state_dict_names():
    cw = quantize_codebook(torch.randn(32, 64, generator=torch.Generator().manual_seed(6)), 8, 4,
                           torch.Generator().manual_seed(7), n_iter=3)
    lin = torch.nn.Linear(64, 32)
    layer = PQLinear.from_float(lin, cw)
    assert sorted(layer.tensors()) == ["assignments", "bias", "centroids"]
    assert sorted(layer.state_dict()) == ["assignments", "bias", "centroids"]
    assert layer.weight_nbytes == cw.nbytes == 8 * 4 * 2 + 32 * 16
    with pytest.raises(ValueError, match=r"fc: codebook shape \(32, 64\) does not match the Linear's \(64, 32\)"):
        PQLinear.from_float(torch.nn.Linear(32, 64), cw, name="fc")
    with pytest.raises(ValueError, match="unknown PQ form 'fast'"):
        layer.set_form("fast")


def test_pq_conv2d_matches_conv_on_the_dequantized_weight():
    from lowbit.nn.pq import PQConv2d
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    cw = quantize_codebook(conv.weight, 16, 9, torch.Generator().manual_seed(0), n_iter=3)
    layer = PQConv2d(cw, conv)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.conv2d(x, cw.dequantize(), conv.bias, 2, 1)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    assert sorted(layer.tensors()) == ["assignments", "bias", "centroids"]
    layer.train_centroids(True)
    layer(x).sum().backward()
    assert layer.centroids.grad is not None and layer.centroids.grad.abs().sum() > 0


@pytest.mark.parametrize("k", (16, 300))
def test_pq_embedding_lookup_equals_dequantized_rows(k):
    from lowbit.nn.pq import PQEmbedding
    w = torch.randn(400, 32, generator=torch.Generator().manual_seed(2))
    cw = quantize_codebook(w, k, 4, torch.Generator().manual_seed(3), n_iter=2)
    layer = PQEmbedding(cw)
    ids = torch.tensor([[0, 399, 5], [5, 17, 0]])
    assert torch.equal(layer(ids), cw.dequantize()[ids])
    assert sorted(layer.state_dict()) == ["assignments", "centroids"]
