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
# the bf16 form rounds activations, weight and output to bf16: error relative to the output scale
PQ_BF16_RTOL = 2e-2


def codebook(out=48, inp=64, k=16, bs=8, seed=0) -> CodebookWeight:
    g = torch.Generator().manual_seed(seed)
    cent = (torch.randn(k, bs, generator=g) * 0.05).half()
    return CodebookWeight(cent, pack_assignments(torch.randint(k, (out, inp // bs), generator=g), k),
                          (out, inp), bs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= PQ_FORM_RTOL * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("form", (None, "cached", "gather", "tiled", "lut", "lutg", "bf16", "bf16-jit",
                                  "ref"))
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
    ref = pq.ref_linear(x.reshape(-1, 64), cw, bias).reshape(2, m, 48)
    if form in ("bf16", "bf16-jit"):
        assert (y - ref).abs().max() <= PQ_BF16_RTOL * ref.abs().max()
    else:
        assert close(y, ref)


def test_the_pin_picks_the_first_pq_form_offered(monkeypatch):
    """tests/conftest.py pins LOWBIT_KERNEL; its first PQ name is pq-tiled. Forced names reach
    PQ layers by their ``pq-`` selector names; a pin with none of them is an error naming them."""
    from lowbit.kernels.select import KernelChoiceError, KernelSelector
    layer = PQLinear(codebook())
    assert layer.form_for(1) == "tiled" and layer.form_for(300) == "tiled"
    monkeypatch.setenv("LOWBIT_KERNEL", "bf16,pq-lut")
    assert PQLinear(codebook()).form_for(3) == "lut"
    layer = PQLinear(codebook())
    layer.selector = KernelSelector.pinned(["f32", "int8mm"])
    with pytest.raises(KernelChoiceError, match="pq-bf16.*pq-gather.*pq-lut.*pq-tiled"):
        layer.form_for(3)


def test_selector_times_pq_forms_and_keeps_only_the_winners_state(tmp_path, monkeypatch):
    from lowbit.kernels.select import KernelSelector
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    layer = PQLinear(codebook(out=40, inp=64, k=16, bs=8))
    layer.selector = KernelSelector(tmp_path, budget_s=0.01)
    with torch.no_grad():
        layer(torch.randn(1, 64))
    form = layer.form_for(1)
    assert form in pq.SELECTABLE
    entry = layer.selector.timings("pq/w4g8/32x64", 1)  # shape class: 16 centroids = 4 bits
    assert entry["path"] == "pq-" + form
    assert sorted(entry["ms"]) == sorted(["fp32"] + ["pq-" + f for f in pq.selectable()])
    assert {"pq-bf16", "pq-gather", "pq-lut", "pq-lutg", "pq-tiled"} <= set(entry["ms"])
    assert set(layer._derived_state) == set(PQLinear._FORM_STATE[form])
    fresh = PQLinear(codebook(out=40, inp=64, k=16, bs=8))  # another layer of the class: no timing
    fresh.selector = KernelSelector(tmp_path, budget_s=0.01)
    assert fresh.form_for(1) == form and fresh._derived_state == {}


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
