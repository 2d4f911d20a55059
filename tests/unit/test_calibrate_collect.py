"""The scoped collection step: what each layer receives, no hooks left behind (even after a
failure), the model untouched, batch forms, and run_until on nn.Sequential and a tiny BERT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.calibrate import CalibrationError, ObserverConfig, capture_inputs, collect, run_until

HESSIAN_RTOL = 1e-6  # float32 products of float32 inputs, summed in float64 (calibrate.hessian)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int = 3, shape: tuple = (5, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_collect_ranges_and_hessians_of_layer_inputs():
    model, data = mlp(), batches(shape=(2, 5, 8))  # 3 batches of (batch 2, tokens 5, features 8)
    stats = collect(model, data, ["0", "2"], progress=False)
    x0 = torch.cat(data).reshape(-1, 8)  # (30, 8) every token into layer 0
    with torch.no_grad():
        x2 = torch.relu(model[0](x0))  # (30, 16) into layer 2
    for name, x in (("0", x0), ("2", x2)):
        s = stats[name]
        assert s.samples == 30
        assert s.input_range[0].item() == x.min().item() and s.input_range[1].item() == x.max().item()
        ref = x.double().T @ x.double() / 30
        assert s.hessian.dtype == torch.float32  # summed in float64, rounded once at the end
        assert torch.allclose(s.hessian.double(), ref, rtol=HESSIAN_RTOL, atol=1e-7)
    assert hooks_left(model) == 0


def test_collect_one_stat_and_per_layer_observers():
    model, data = mlp(), batches()
    only_h = collect(model, data, ["2"], stats=("hessian",), progress=False)["2"]
    assert only_h.input_range is None and only_h.hessian.shape == (16, 16)
    cfgs = {"0": "minmax", "2": ObserverConfig(name="percentile", symmetric=True)}
    st = collect(model, data, ["0", "2"], stats="range", observer=cfgs, progress=False)
    assert st["0"].hessian is None and st["2"].input_range[0].item() == -st["2"].input_range[1].item()
    with pytest.raises(CalibrationError, match="no observer given for layer '2'"):
        collect(model, data, ["0", "2"], stats="range", observer={"0": "ema"}, progress=False)


def test_model_outputs_and_state_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()  # BatchNorm would update running stats and Dropout would drop, were it not eval
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        out_before = model(x)
    model.train()
    collect(model, batches(shape=(6, 8)), ["0", "3"], progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())  # flags restored
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    assert hooks_left(model) == 0


class Exploding(nn.Module):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.inner, self.calls, self.after = mlp(), 0, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.inner[0](x)
        if self.calls > self.after:
            raise RuntimeError("boom inside the model")
        return self.inner[2](self.inner[1](h))


def test_an_exception_inside_the_model_leaves_no_hooks():
    model = Exploding(after=1)
    model.train()
    with pytest.raises(RuntimeError, match="boom") as info:
        collect(model, batches(), ["inner.0", "inner.2"], progress=False)
    assert "calibration batch 1" in "\n".join(info.value.__notes__)
    assert hooks_left(model) == 0 and all(m.training for m in model.modules())


class KwargModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.lin(input_ids * scale)


def test_batch_forms_and_the_error_for_others():
    model = KwargModel()
    x = torch.ones(3, 4)
    got = [collect(model, [b], ["lin"], stats="range", progress=False)["lin"].input_range[1].item()
           for b in (x, (x, 2.0), [x, 3.0], {"input_ids": x, "scale": 4.0})]
    assert got == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(CalibrationError, match="batch 0 is a builtins.set; a batch must be a Tensor"):
        collect(model, [{1, 2}], ["lin"], progress=False)
    with pytest.raises(CalibrationError, match="found a single Tensor"):
        collect(model, x, ["lin"], progress=False)
    assert hooks_left(model) == 0


def test_collect_argument_errors():
    model = mlp()
    with pytest.raises(CalibrationError, match=r"no submodule named \['9'\] in Sequential"):
        collect(model, batches(), ["0", "9"], progress=False)
    with pytest.raises(CalibrationError, match="stats must be a non-empty subset"):
        collect(model, batches(), ["0"], stats=("ranges",), progress=False)
    with pytest.raises(CalibrationError, match="layer '0': observer 'minmax': the input holds NaN"):
        collect(model, [torch.full((2, 8), float("nan"))], ["0"], progress=False)
    assert hooks_left(model) == 0


class HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_never_called_is_reported_by_name():
    model = HalfUsed()
    with pytest.raises(CalibrationError, match=r"never called during calibration.*\['unused'\]"):
        collect(model, batches(), ["used", "unused"], progress=False)
    with pytest.raises(CalibrationError, match="finished without calling 'unused'"):
        run_until(model, batches(1)[0], "unused")
    assert hooks_left(model) == 0


class Trap(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("run_until ran past its module")


def test_run_until_stops_at_the_module_on_a_sequential():
    model = nn.Sequential(mlp(), nn.Linear(4, 3), Trap())
    x = batches(1)[0]
    cap = run_until(model, x, "1")
    with torch.no_grad():
        assert torch.equal(cap.args[0], model[0](x))
    assert cap.kwargs == {} and not cap.args[0].is_inference()
    assert [len(c.args) for c in capture_inputs(model, batches(2), "1")] == [1, 1]
    assert hooks_left(model) == 0


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def bert_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_run_until_on_a_tiny_bert_reproduces_the_block():
    model = tiny_bert()
    batch = bert_batch(0)
    seen = {}
    handle = model.encoder.layer[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    cap = run_until(model, batch, "encoder.layer.1")
    with torch.no_grad():
        again = model.encoder.layer[1](*cap.args, **cap.kwargs)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert torch.equal(first(again), first(seen["out"]))
    assert hooks_left(model) == 0


def test_collect_on_a_tiny_bert_with_dict_batches():
    model = tiny_bert()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    stats = collect(model, [bert_batch(1), bert_batch(2)], names, observer="histogram", progress=False)
    for n in names:
        assert stats[n].samples == 2 * 2 * 9  # two batches of (2, 9) tokens
        lo, hi = stats[n].input_range
        assert lo.item() < 0 < hi.item()
    assert stats[names[1]].hessian.shape == (32, 32)
    assert hooks_left(model) == 0


class _Shared(nn.Module):
    """Three projections of one input (like q/k/v), then a head that collect need not run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.head = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(12, 3)
        self.head_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        self.head_calls += 1
        return self.head(y)


def test_layers_fed_one_tensor_get_its_hessian_and_the_rest_runs_once():
    model, data = _Shared(), batches(n=4)
    stats = collect(model, data, ["q", "k", "v"], stats=("hessian",), progress=False)
    x = torch.cat(data).double()  # (20, 8)
    ref = x.T @ x / 20
    for n in "qkv":
        assert stats[n].samples == 20
        assert torch.allclose(stats[n].hessian.double(), ref, rtol=HESSIAN_RTOL, atol=1e-7)
    assert torch.equal(stats["q"].hessian, stats["v"].hessian)
    assert model.head_calls == 1  # batches 2-4 stop after v, the last collected layer
    assert hooks_left(model) == 0


class _InPlace(nn.Module):
    """Layer b sees the same tensor object as layer a, changed in place in between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        y = self.a(x)
        x.mul_(2.0)
        return y + self.b(x)


def test_a_tensor_changed_in_place_gets_its_own_hessian():
    stats = collect(_InPlace(), batches(n=2), ["a", "b"], stats=("hessian",), progress=False)
    assert torch.allclose(stats["b"].hessian, 4.0 * stats["a"].hessian, rtol=HESSIAN_RTOL, atol=1e-7)


def test_layers_fed_one_tensor_share_one_hessian_object():
    # q/k/v's Hessians are one tensor (one float64 sum while collecting): SmolLM2's 210 layers
    # hold 120 sums, 0.8 GiB instead of 1.0
    stats = collect(_Shared(), batches(n=3), ["q", "k", "v"], stats=("hessian",), progress=False)
    assert stats["q"].hessian is stats["k"].hessian is stats["v"].hessian
    assert not stats["q"].hessian.is_inference()  # callers may scale it in place (smoothing)


class _Diverging(nn.Module):
    """Batch-dependent wiring: a and b share x on the first batch only; c is called twice on x
    on the first batch and once after (call counts may shrink, not grow: `_StopAfter`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(8, 4) for _ in range(3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.a(x) + self.b(x if self.calls == 1 else x + 1.0) + self.c(x)
        return y + self.c(x) if self.calls == 1 else y


def test_a_shared_hessian_splits_when_the_layers_inputs_diverge():
    data = batches(n=4)
    stats = collect(_Diverging(), data, ["a", "b", "c"], stats=("hessian",), progress=False)
    xs = [x.double() for x in data]

    def mean_gram(rows: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(rows)
        return x.T @ x / x.shape[0]

    want = {"a": mean_gram(xs), "b": mean_gram([xs[0]] + [x + 1.0 for x in xs[1:]]),
            "c": mean_gram(xs[:1] * 2 + xs[1:])}
    for n, ref in want.items():
        assert torch.allclose(stats[n].hessian.double(), ref, rtol=HESSIAN_RTOL, atol=1e-7), n
    assert stats["c"].samples == sum(x.shape[0] for x in xs) + xs[0].shape[0]
    assert len({id(s.hessian) for s in stats.values()}) == 3
