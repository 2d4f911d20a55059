"""SmoothQuant: factor formula, function-preserving folds, traced pairs on tiny BERT / LLaMA, the
all-or-nothing apply step and quantize(smooth=alpha)."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.smooth import (MIN_FACTOR, SmoothError, consumer_absmax, fold_consumer,
                                      fold_producer, smoothing_factors)
from lowbit.apply import ChannelScale, scale_channels
from lowbit.calibrate import ObserverConfig, collect
from lowbit.calibrate.pairs import find_pairs
from lowbit.smooth import FOLD_RTOL, smooth

transformers = pytest.importorskip("transformers")

FLOAT_RTOL = 1e-5  # a single fold in float32: outputs equal to this, relative to their max
ALPHA_ONE_ATOL = 1e-5  # alpha=1 makes every smoothed input channel's absmax 1 (float rounding)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max())


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (2, 6), generator=g),) for _ in range(n)]


def test_factors_match_the_formula_on_hand_made_maxima():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    assert smoothing_factors(act, w, 0.5).tolist() == [2.0, 0.5, 1.0, 1.0]
    assert smoothing_factors(act, w, 1.0).tolist() == [4.0, 1.0, 1.0, 1.0]
    assert smoothing_factors(act, w, 0.0).tolist() == [1.0, 0.25, 1.0, 1.0]
    huge = smoothing_factors(torch.tensor([1e12]), torch.tensor([1e-12]), 0.5)
    assert huge.item() == pytest.approx(1 / MIN_FACTOR)


def test_consumer_absmax_is_the_column_max_over_every_consumer():
    w1 = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    w2 = torch.tensor([[-3.0, 1.0]])
    assert consumer_absmax([w1, w2]).tolist() == [3.0, 5.0]
    with pytest.raises(SmoothError, match="same number of input"):
        consumer_absmax([w1, torch.ones(2, 3)])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5"])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(SmoothError, match=r"alpha must be a number in \[0, 1\]"):
        smoothing_factors(torch.ones(2), torch.ones(2), alpha)


def test_fold_into_layernorm_keeps_the_function():
    g = torch.Generator().manual_seed(0)
    norm, a, b = torch.nn.LayerNorm(8), torch.nn.Linear(8, 5), torch.nn.Linear(8, 3)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    x = torch.randn(4, 8, generator=g)
    before = torch.cat([a(norm(x)), b(norm(x))], 1)
    s = torch.rand(8, generator=g, dtype=torch.float64) * 10 + 0.1
    with torch.no_grad():
        w, bias = fold_producer(norm.weight, norm.bias, s)
        norm.weight.copy_(w), norm.bias.copy_(bias)
        a.weight.copy_(fold_consumer(a.weight, s)), b.weight.copy_(fold_consumer(b.weight, s))
    after = torch.cat([a(norm(x)), b(norm(x))], 1)
    assert rel_err(before, after) < FLOAT_RTOL
    assert not torch.equal(norm.weight, torch.nn.LayerNorm(8).weight)


def test_fold_into_linear_rows_keeps_the_function():
    g = torch.Generator().manual_seed(1)
    p, c = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)
    x = torch.randn(5, 6, generator=g)
    before = c(p(x))
    s = torch.rand(8, generator=g, dtype=torch.float64) * 5 + 0.2
    with torch.no_grad():
        w, bias = fold_producer(p.weight, p.bias, s)
        p.weight.copy_(w), p.bias.copy_(bias), c.weight.copy_(fold_consumer(c.weight, s))
    assert rel_err(before, c(p(x))) < FLOAT_RTOL
    with pytest.raises(SmoothError, match="8 channels but 3 smoothing factors"):
        fold_producer(p.weight, p.bias, torch.ones(3))


def test_pairs_on_tiny_llama_are_the_norms_and_value_projections():
    found = find_pairs(tiny_llama(), token_batches(1)[0])
    got = {(p.producer, p.consumers, p.how) for p in found.pairs}
    for i in range(2):
        pre = f"model.layers.{i}."
        assert (pre + "input_layernorm", tuple(pre + f"self_attn.{x}_proj" for x in "qkv"), "traced") in got
        assert (pre + "post_attention_layernorm", (pre + "mlp.gate_proj", pre + "mlp.up_proj"), "traced") in got
        assert (pre + "self_attn.v_proj", (pre + "self_attn.o_proj",), "fallback") in got
    assert len(got) == 6
    assert sorted(found.unpaired) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_pairs_on_tiny_bert_refuse_post_ln_layernorms():
    model = tiny_bert()
    found = find_pairs(model, {"input_ids": token_batches(1)[0][0]})
    assert [(p.producer, p.consumers) for p in found.pairs] == [
        (f"encoder.layer.{i}.attention.self.value", (f"encoder.layer.{i}.attention.output.dense",))
        for i in range(2)]
    why = found.unpaired["encoder.layer.0.attention.self.query"]
    assert why.startswith("producer embeddings.LayerNorm: its output also feeds 1 other op")
    assert "attention.output.LayerNorm" in found.unpaired["encoder.layer.1.intermediate.dense"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_smooth_keeps_llama_logits_and_flattens_inputs_at_alpha_one():
    model, data = tiny_llama(), token_batches(3)
    with torch.no_grad():  # give the first norm an outlier channel, as trained LLMs have
        model.model.layers[0].input_layernorm.weight[3] = 40.0
    before = model(*data[0]).logits
    report = smooth(model, data, alpha=1.0)
    assert len(report.pairs) == 6 and report.max_rel_change <= FOLD_RTOL
    assert rel_err(before, model(*data[0]).logits) < FOLD_RTOL
    names = [p.consumers[0] for p in report.pairs]
    ranges = collect(model, data, names, stats=("range",), progress=False,
                     observer=ObserverConfig(name="minmax", per_channel=True))
    for n in names:
        lo, hi = ranges[n].input_range
        assert torch.allclose(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo), atol=ALPHA_ONE_ATOL), n


def test_scale_channels_undoes_everything_when_the_check_fails():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = torch.full((16,), 2.0, dtype=torch.float64)
    scales = [ChannelScale("model.layers.0.input_layernorm",
                           tuple(f"model.layers.0.self_attn.{x}_proj" for x in "qkv"), s)]

    def fail() -> None:
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError, match="check failed"):
        scale_channels(model, scales, fail)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    bad = scales + [ChannelScale("model.layers.1.input_layernorm", ("model.layers.1.mlp",), s)]
    with pytest.raises(lowbit.errors.QuantizationError, match="must be a torch.nn.Linear, found LlamaMLP"):
        scale_channels(model, bad)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_scale_channels_checks_the_folded_function_and_folds_consumers_after():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    s = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    names = tuple(f"model.layers.0.self_attn.{x}_proj" for x in "qkv")
    old = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    seen = {}

    def check() -> None:  # runs on the folded function, consumers not yet rewritten
        with torch.no_grad():
            seen["err"] = rel_err(before, model(ids).logits)
        seen["q"] = torch.equal(model.get_submodule(names[0]).weight, old[names[0]])

    scale_channels(model, [ChannelScale("model.layers.0.input_layernorm", names, s)], check)
    assert seen["q"] and 0 < seen["err"] < FLOAT_RTOL
    for n in names:  # the same values fold_consumer gives
        assert torch.equal(model.get_submodule(n).weight, fold_consumer(old[n], s, n))
    with torch.no_grad():
        assert rel_err(before, model(ids).logits) < FLOAT_RTOL
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_scale_channels_refuses_a_consumer_weight_shared_with_another_module():
    model = tiny_llama()
    q, k = (model.get_submodule(f"model.layers.0.self_attn.{x}_proj") for x in "qk")
    model.model.layers[1].self_attn.q_proj.weight = q.weight  # tied: the same Parameter
    state = {k_: v.clone() for k_, v in model.state_dict().items()}
    scale = ChannelScale("model.layers.0.input_layernorm", ("model.layers.0.self_attn.q_proj",),
                         torch.full((16,), 2.0, dtype=torch.float64))
    with pytest.raises(lowbit.errors.QuantizationError, match=r"shared with \['model.layers.1.self_attn.q_proj'\]"):
        scale_channels(model, [scale])
    assert all(torch.equal(state[k_], v) for k_, v in model.state_dict().items())
    assert k.weight is not q.weight


def test_quantize_smooth_reads_a_generator_once_and_smooths_first():
    model, data = tiny_llama(), token_batches(2)
    q = lowbit.quantize(model, "w8", data=(b for b in data), smooth=0.5, verbose=False)
    assert len(q.lowbit_smooth.pairs) == 6
    assert "model.layers.0.mlp.down_proj" in q.lowbit_smooth.unsmoothed
    assert type(q.model.layers[0].self_attn.q_proj).__name__ != "Linear"
    with pytest.raises(SmoothError, match="needs calibration data"):
        lowbit.quantize(tiny_llama(), "w8", smooth=0.5, verbose=False)


class Boom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)

    def forward(self, x):
        self.lin(self.norm(x))
        raise RuntimeError("model failed mid-forward")


def test_find_pairs_leaves_no_hooks_when_the_model_raises_and_names_non_linears():
    model = Boom()
    with pytest.raises(RuntimeError, match="mid-forward"):
        find_pairs(model, torch.ones(2, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 3), torch.nn.ReLU())
    found = find_pairs(model, torch.randn(2, 4), names=["1", "2"])
    assert [(p.producer, p.consumers) for p in found.pairs] == [("0", ("1",))]
    assert found.unpaired == {"2": "not a torch.nn.Linear (only Linears are smoothed)"}


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_gptq_with_smoothing_calibrates_once_and_equals_smoothing_first(make):
    """quantize(smooth=, method="gptq") takes the Hessians from smoothing's own pass (transformed
    by the factors) instead of a second pass on the smoothed model: same codes, one pass."""
    data = token_batches(6)
    names = sorted(lowbit.plan(make(), "w4g8", method="gptq").layers)

    def calls(model):  # forward calls of the whole model, through its token embedding
        seen = []
        model.get_input_embeddings().register_forward_pre_hook(lambda *a: seen.append(1))
        return seen

    one = make()
    n_one = calls(one)
    lowbit.quantize(one, "w4g8", method="gptq", data=data, smooth=0.5, verbose=False)
    two = make()
    smooth(two, data, 0.5, names=names)
    n_two = calls(two)
    lowbit.quantize(two, "w4g8", method="gptq", data=data, verbose=False)
    assert one.lowbit_smooth.pairs and one.lowbit_source["smooth_alpha"] == 0.5
    for name in names:
        a, b = one.get_submodule(name).qweight, two.get_submodule(name).qweight
        assert torch.equal(a.scale, b.scale) or rel_err(a.scale.float(), b.scale.float()) < 1e-3, name
        same = (a.dequantize() == b.dequantize()).float().mean().item()
        assert same >= 0.999, f"{name}: {same:.4f} of the weights agree"  # 1.0 here
    # one pass over the data (plus find_pairs' and the fold check's 3 calls of the first batch,
    # and the guardrail's timing, which does not run the whole model)
    assert len(n_one) == len(data) + 3
    assert len(n_two) == len(data)  # the second model's own calibration pass, after smoothing


def test_probe_batch_cuts_token_batches_only():
    from lowbit.smooth import PROBE_TOKENS, probe_batch
    ids = torch.arange(2 * 100).reshape(2, 100)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 100, dtype=torch.long), "flag": True}
    cut = probe_batch(batch)
    assert cut["input_ids"].shape == (2, PROBE_TOKENS) and torch.equal(cut["input_ids"], ids[:, :PROBE_TOKENS])
    assert cut["attention_mask"].shape == (2, PROBE_TOKENS) and cut["flag"] is True
    assert probe_batch(ids).shape == (2, PROBE_TOKENS)
    floats = torch.randn(2, 100)  # features, not tokens
    assert probe_batch(floats) is floats
    odd = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8)}  # not all (B, T): as it is
    assert probe_batch(odd) is odd
    short = {"input_ids": ids[:, :10]}
    assert probe_batch(short) is short
