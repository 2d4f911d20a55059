"""Sequential (block-by-block) GPTQ (src/lowbit/sequential.py), method options and the GPTQ
provenance a file records, on tiny random transformers models (no downloads)."""
from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.api import make_recipe, quantize
from lowbit.apply import apply_blocks
from lowbit.calibrate import collect
from lowbit.errors import RecipeError
from lowbit.provenance import calibration_info, describe
from lowbit.recipe import Recipe, Rule, plan
from lowbit.report import inspect_table
from lowbit.sequential import find_blocks

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 97, 3
DAMP_EFFECT_MIN = 1  # codes that a 10x damping changes, at least (measured: hundreds)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_llama(layers: int = LAYERS) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 6, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, VOCAB, (1, seq), generator=g)} for _ in range(n)]


def test_sequential_equals_calibrating_the_whole_partly_quantized_model():
    """What sequential mode must give exactly: each block's Hessians measured by running the
    whole model (earlier blocks already quantized) on the data. The driver instead runs only the
    block on activations it carried forward: the same numbers, so the same codes, bit for bit."""
    data = batches()
    ref = tiny_llama()
    p = plan(ref, make_recipe("w4g32", method="gptq"))
    steps = [[n for n in p.layers if n.startswith(f"model.layers.{i}.")] for i in range(LAYERS)]
    apply_blocks(ref, p, steps, lambda names: collect(ref, data, names, stats=("hessian",), progress=False))
    seq = quantize(tiny_llama(), "w4g32", method="gptq", data=data, sequential=True, verbose=False)
    a, b = ref.state_dict(), seq.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_first_block_matches_one_shot_and_later_blocks_differ():
    """Block 0 sees float inputs in both modes: identical codes. Later blocks see the quantized
    blocks' outputs in sequential mode only, so their codes differ from one-shot GPTQ."""
    data = batches()
    one = quantize(tiny_llama(), "w4g32", method="gptq", data=data, verbose=False)
    seq = quantize(tiny_llama(), "w4g32", method="gptq", data=data, sequential=True, verbose=False)
    a, b = one.state_dict(), seq.state_dict()
    codes = [k for k in a if k.endswith(".qdata")]
    first = [k for k in codes if k.startswith("model.layers.0.")]
    later = [k for k in codes if not k.startswith("model.layers.0.")]
    assert first and all(torch.equal(a[k], b[k]) for k in first)
    assert any(not torch.equal(a[k], b[k]) for k in later)


def test_layers_outside_the_blocks_are_quantized_in_their_own_steps():
    model = tiny_llama()
    data = batches(3)
    quantize(model, Recipe((Rule(("Linear",), "w4g32", method="gptq"),), skip_output_head=False),
             data=data, sequential=True, verbose=False)
    assert type(model.lm_head).__name__ == "QLinear"
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "QLinear"


def test_find_blocks_picks_the_longest_list_and_refuses_a_model_without_one():
    model = tiny_llama()
    assert find_blocks(model, [n for n, _ in model.named_modules()]) == ("model.layers", LAYERS)
    with pytest.raises(RecipeError, match="repeated blocks"):
        quantize(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)), "w4g32",
                 targets=["0"], method="gptq", data=[torch.randn(2, 32)], sequential=True, verbose=False)


def test_sequential_failure_restores_every_block(monkeypatch):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    from lowbit import algorithms
    real = algorithms.ALGORITHMS["gptq"]

    def fail_late(weight, spec, name, stats=None, **options):
        if name.startswith("model.layers.2."):
            raise lowbit.errors.QuantizationError(f"{name}: injected")
        return real(weight, spec, name, stats, **options)
    monkeypatch.setitem(algorithms.ALGORITHMS, "gptq", fail_late)
    with pytest.raises(lowbit.errors.QuantizationError, match="injected"):
        quantize(model, "w4g32", method="gptq", data=batches(2), sequential=True, verbose=False)
    assert all(type(m).__name__ != "QLinear" for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_damp_option_changes_codes_and_bad_options_name_the_valid_ones():
    data = batches()
    a = quantize(tiny_llama(), "w4g32", method="gptq", data=data, verbose=False).state_dict()
    b = quantize(tiny_llama(), "w4g32", method="gptq", data=data, verbose=False,
                 method_options={"damp": 0.01}).state_dict()
    changed = sum(int((a[k] != b[k]).sum()) for k in a if k.endswith(".qdata"))
    assert changed >= DAMP_EFFECT_MIN
    with pytest.raises(RecipeError, match="no option.*damp"):
        make_recipe("w4g32", method="gptq", method_options={"dampening": 0.1})
    with pytest.raises(RecipeError, match="positive float"):
        make_recipe("w4g32", method="gptq", method_options={"damp": -1.0})
    with pytest.raises(RecipeError, match="options: none"):
        make_recipe("w4g32", method="rtn", method_options={"damp": 0.1})


def test_rule_options_round_trip_through_json():
    r = Recipe((Rule(("Linear",), "w3g128", method="gptq", options={"damp": 0.1, "act_order": False}),))
    back = Recipe.from_json(r.to_json())
    assert back == r and dict(back.rules[0].options) == {"act_order": False, "damp": 0.1}
    assert Recipe.from_json(Recipe((Rule(("Linear",), "w4"),)).to_json()).rules[0].options == ()


def test_gptq_provenance_is_saved_loaded_and_shown(tmp_path):
    data = batches(4)
    model = quantize(tiny_llama(), "w4g32", method="gptq", data=data, sequential=True, verbose=False,
                     method_options={"damp": 0.05})
    path = lowbit.save(model, tmp_path / "q")
    prov = lowbit.io.read_header(path)["provenance"]
    assert prov["method"] == "gptq" and prov["sequential"] is True
    assert prov["method_options"] == {"gptq": {"damp": 0.05, "act_order": True, "block_size": 128}}
    assert prov["calibration"] == {"sha256": calibration_info(data)["sha256"], "batches": 4,
                                   "samples": 4, "tokens": 64}
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.lowbit_source["calibration"] == prov["calibration"]
    again = lowbit.save(loaded, tmp_path / "again")  # a re-save keeps the provenance
    assert lowbit.io.read_header(again)["provenance"]["calibration"] == prov["calibration"]
    shown = inspect_table(path)
    assert "gptq act_order=True, block_size=128, damp=0.05" in shown  # header keys sorted
    assert f"4 samples in 4 batches, 64 tokens, sha256 {prov['calibration']['sha256'][:16]}" in shown
    assert "sequential: True" in shown


def test_calibration_hash_depends_on_every_token_and_rtn_records_no_calibration():
    data = batches(3)
    changed = [dict(b) for b in data]
    changed[2] = {"input_ids": changed[2]["input_ids"].clone()}
    changed[2]["input_ids"][0, -1] += 1
    assert calibration_info(data)["sha256"] != calibration_info(changed)["sha256"]
    model = quantize(tiny_llama(), "w4g32", verbose=False)
    assert "calibration" not in model.lowbit_source and "method_options" not in model.lowbit_source
    assert describe(model.lowbit_source) == "method: rtn"
