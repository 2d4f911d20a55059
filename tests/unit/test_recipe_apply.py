"""plan() (pure, one target grammar) and apply()/quantize() (the one mutation), on small models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import Plan, QuantizationError, Recipe, RecipeError, Rule, SchemeError, make_recipe, plan
from lowbit.nn import QConv2d, QEmbedding, QLinear
from lowbit.spec import parse_scheme

# cosine(float output, quantized output) of the Mixed model below; measured 0.99863
MIXED_OUTPUT_COSINE_BUDGET = 0.995
# per-layer weight SQNR floors for that model (measured: emb w8r 46.7, conv w8 49.2, fc w4g32 24.3)
MIXED_LAYER_SQNR_BUDGET_DB = {"emb": 45.0, "conv": 47.0, "fc": 22.0}
# Mixed weights in float32: emb 50*32*4 + conv 8*27*4 + fc 64*160*4
MIXED_FLOAT_BYTES = 6400 + 864 + 40960
# emb w8r: 50*32 codes + 50 scales (fp16) + 50 zero points (uint8); conv w8: 8*27 + 8*2;
# fc w4g32: 64*80 packed bytes + 64*5 scales (fp16) and zero points (uint8)
MIXED_QUANT_BYTES = (1600 + 100 + 50) + (216 + 16) + (5120 + 640 + 320)
HEAD_REASON = "output head"


def seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        x = x + self.attn(x)
        return self.norm(x + self.mlp(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 100)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


NET_LINEARS = [f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn", "mlp.0", "mlp.2")]


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(32 + 8 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, ids, img):
        e = self.emb(ids).mean(1)  # (B, 32)
        c = self.conv(img).flatten(1)  # (B, 128)
        return self.head(torch.relu(self.fc(torch.cat([e, c], 1))))


class WithLMHead(nn.Module):
    """transformers-style: the output head is named by get_output_embeddings, not position."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(32, 32)
        self.pooler = nn.Linear(32, 32)

    def get_output_embeddings(self):
        return self.lm_head


def rule(targets, scheme="w8", ignore=()):
    return Rule(tuple(targets), scheme, tuple(ignore))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ plan: target grammar


def test_default_skips_output_head_with_reason():
    p = plan(seq(), make_recipe("w8"))
    assert list(p.layers) == ["0", "2"]
    assert list(p.skipped) == ["4"]
    assert HEAD_REASON in p.skipped["4"]
    assert all(r.spec == parse_scheme("w8") for r in p.layers.values())


def test_default_on_custom_module_skips_head_and_quantizes_only_linears():
    p = plan(Net(), make_recipe("w4g32"))
    assert sorted(p.layers) == sorted(NET_LINEARS)
    assert p.skipped == {"head": p.skipped["head"]} and HEAD_REASON in p.skipped["head"]


def test_head_comes_from_get_output_embeddings():
    p = plan(WithLMHead(), make_recipe("w8"))
    assert list(p.layers) == ["pooler"]
    assert list(p.skipped) == ["lm_head"]


def test_explicit_targets_quantize_the_head():
    assert list(plan(seq(), make_recipe("w8", targets=["4"])).layers) == ["4"]
    recipe = Recipe((rule(["Linear"]),), skip_output_head=False)
    assert list(plan(seq(), recipe).layers) == ["0", "2", "4"]


def test_target_by_exact_name():
    p = plan(Net(), Recipe((rule(["blocks.0.attn", "blocks.1.mlp.2"]),)))
    assert list(p.layers) == ["blocks.0.attn", "blocks.1.mlp.2"]
    assert p.skipped == {}


def test_exact_name_is_not_a_prefix():
    p = plan(Net(), Recipe((rule(["blocks.0.mlp"]),)), allow_empty=True)  # a container, not its children
    assert p.layers == {}
    assert list(p.skipped) == ["blocks.0.mlp"]
    assert "unsupported module type Sequential" in p.skipped["blocks.0.mlp"]


def test_target_by_class_name():
    p = plan(Net(), Recipe((rule(["Embedding"], "w8r"),)))
    assert list(p.layers) == ["emb"]
    assert p.layers["emb"].spec == parse_scheme("w8r")


def test_target_by_regex_is_a_full_match():
    p = plan(Net(), Recipe((rule([r"re:blocks\.\d+\.mlp\.\d+"]),)))
    assert sorted(p.layers) == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    assert plan(Net(), Recipe((rule(["re:mlp"]),)), allow_empty=True).layers == {}  # no substring matches
    with pytest.raises(RecipeError, match=r"\['re:mlp'\] match no module"):
        plan(Net(), Recipe((rule(["re:mlp"]),)))


def test_ignore_by_regex_name_and_class():
    p = plan(Net(), Recipe((rule(["Linear"], ignore=[r"re:blocks\.1\..*", "blocks.0.attn"]),)))
    assert sorted(p.layers) == ["blocks.0.mlp.0", "blocks.0.mlp.2"]
    p = plan(Net(), Recipe((rule([r"re:.*"], ignore=["LayerNorm", "Sequential", "ModuleList",
                                                     "Block", "GELU", "Net"]),)))
    assert sorted(p.layers) == sorted(NET_LINEARS + ["emb"])


def test_last_matching_rule_wins():
    rules = (rule(["Linear"], "w4g32"), rule([r"re:.*mlp.*"], "w8"))
    p = plan(Net(), Recipe(rules))
    for name in NET_LINEARS:
        want = "w8" if ".mlp." in name else "w4g32"
        assert p.layers[name].spec.name == want, name
    p = plan(Net(), Recipe(tuple(reversed(rules))))
    assert {r.spec.name for r in p.layers.values()} == {"w4g32"}


def test_a_later_rule_that_ignores_a_module_leaves_the_earlier_match():
    rules = (rule(["Linear"], "w4g32"), rule(["Linear"], "w8", ignore=["blocks.0.attn"]))
    p = plan(Net(), Recipe(rules))
    assert p.layers["blocks.0.attn"].spec.name == "w4g32"
    assert p.layers["blocks.1.attn"].spec.name == "w8"


def test_group_size_not_dividing_in_features_is_skipped_with_reason():
    p = plan(seq(), make_recipe("w4g32"))  # Linear(16, 32): 16 % 32 != 0
    assert list(p.layers) == ["2"]
    assert "group_size 32" in p.skipped["0"] and "16" in p.skipped["0"]
    assert HEAD_REASON in p.skipped["4"]


def test_unsupported_types_reported_by_name():
    p = plan(Net(), Recipe((rule(["LayerNorm", "GELU"]),)), allow_empty=True)
    assert sorted(p.skipped) == ["blocks.0.mlp.1", "blocks.0.norm", "blocks.1.mlp.1", "blocks.1.norm"]
    assert "unsupported module type LayerNorm" in p.skipped["blocks.0.norm"]
    assert "unsupported module type GELU" in p.skipped["blocks.0.mlp.1"]
    assert "Linear" in p.skipped["blocks.0.norm"]  # the reason lists what is supported
    assert p.layers == {}


@pytest.mark.parametrize("module,scheme,reason", [
    (nn.Embedding(10, 32), "w8a8", "dynamic int8 inputs are not built for Embedding"),
    (nn.Embedding(10, 32, max_norm=1.0), "w8r", "max_norm"),
    (nn.Embedding(10, 32, sparse=True), "w8r", "sparse"),
    (nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), "w8", "padding_mode 'reflect'"),
    (nn.Conv2d(3, 8, 3), "w4g32", "27 input columns are not divisible by group_size 32"),
])
def test_skip_reasons(module, scheme, reason):
    model = nn.Sequential(module)
    p = plan(model, Recipe((rule(["0"], scheme),), skip_output_head=False), allow_empty=True)
    assert p.layers == {}
    assert reason in p.skipped["0"]
    with pytest.raises(RecipeError, match="nothing to quantize") as info:  # without allow_empty
        plan(model, Recipe((rule(["0"], scheme),), skip_output_head=False))
    assert reason in str(info.value)


def test_plan_does_not_change_the_model():
    model = Net()
    before = state_snapshot(model)
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    p = plan(model, Recipe((rule(["Linear"], "w4g32"), rule(["Embedding"], "w8r"))))
    assert len(p.layers) == 7
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert not hasattr(model, "lowbit_report")


def test_plan_prints_every_decision():
    text = str(plan(seq(), make_recipe("w4g32")))
    assert text.splitlines() == [
        "2: w4g32 (rtn)",
        "0: skipped (16 input columns are not divisible by group_size 32)",
        "4: skipped (output head (kept in float; name it in targets with skip_output_head=False))",
    ]


# ------------------------------------------------------------------ quantize / apply


def test_quantize_swaps_modules_and_stays_close_to_float():
    model = Mixed()
    g = torch.Generator().manual_seed(1)
    ids, img = torch.randint(0, 50, (16, 5), generator=g), torch.randn(16, 3, 4, 4, generator=g)
    with torch.no_grad():
        ref = model(ids, img)
    emb_float = model.emb.weight.detach().clone()
    recipe = Recipe((rule(["Linear"], "w4g32"), rule(["Embedding"], "w8r"), rule(["Conv2d"], "w8")))
    out_model = lowbit.quantize(model, recipe, verbose=False)
    assert out_model is model
    assert type(model.emb) is QEmbedding and type(model.conv) is QConv2d and type(model.fc) is QLinear
    assert type(model.head) is nn.Linear

    with torch.no_grad():
        out = model(ids, img)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
    assert cos > MIXED_OUTPUT_COSINE_BUDGET

    # a lookup returns exactly the dequantized rows, and those stay close to the float table
    assert torch.equal(model.emb(ids), model.emb.dequantized_weight()[ids])
    assert (model.emb.dequantized_weight() - emb_float).abs().max() <= model.emb.scale.float().max() / 2 + 1e-6

    report = model.lowbit_report
    assert [r.name for r in report.layers] == ["emb", "conv", "fc"]
    assert [r.scheme for r in report.layers] == ["w8r", "w8", "w4g32"]
    assert report.float_bytes == MIXED_FLOAT_BYTES
    assert report.quant_bytes == MIXED_QUANT_BYTES
    assert {r.name: r.quant_bytes for r in report.layers} == \
        {n: getattr(model, n).weight_nbytes for n in ("emb", "conv", "fc")}
    for r in report.layers:
        assert r.sqnr_db >= MIXED_LAYER_SQNR_BUDGET_DB[r.name], r
    assert list(report.skipped) == ["head"]
    assert "0.167x" in str(report)  # 8062 / 48224


def test_quantize_default_scheme_and_verbose_report(capsys):
    model = seq()
    lowbit.quantize(model, "w8")
    err = capsys.readouterr().err
    assert "quantized 2 layers, skipped 1" in err
    assert "skipped 4: output head" in err
    assert [type(model[i]) for i in (0, 2, 4)] == [QLinear, QLinear, nn.Linear]
    assert model.lowbit_source["scheme"] == "w8"
    assert len(model.lowbit_source["source_sha256"]) == 64


def test_quantized_sequential_output_close_to_float():
    model = seq()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        lowbit.quantize(model, "w8", verbose=False)
        out = model(x)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.min().item() > MIXED_OUTPUT_COSINE_BUDGET


def test_quantize_leaves_unplanned_modules_untouched():
    model = Net()
    head_before = model.head.weight.detach().clone()
    norm_before = model.blocks[0].norm.weight.detach().clone()
    lowbit.quantize(model, "w4g32", verbose=False)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[0].norm.weight, norm_before)
    assert all(type(model.get_submodule(n)) is QLinear for n in NET_LINEARS)


# ------------------------------------------------------------------ Rule / Recipe data


def test_recipe_json_round_trip():
    recipe = Recipe((rule(["Linear"], "w4g128-greedy", ignore=[r"re:.*\.attn"]),
                     rule(["Embedding"], "w8r"), rule(["head"], "w8-p99.9")),
                    skip_output_head=False)
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert again.to_json() == recipe.to_json()
    assert plan(Net(), again) == plan(Net(), recipe)


def test_rule_normalizes_fields():
    r = Rule(["Linear"], "int4", ["head"])
    assert r.targets == ("Linear",) and r.ignore == ("head",)
    assert r.spec == parse_scheme("w4g128")
    assert r.method == "rtn"


@pytest.mark.parametrize("targets,ignore", [(("re:[unclosed",), ()), (("Linear",), ("re:(?P<x",))])
def test_bad_regex_raises_recipeerror(targets, ignore):
    with pytest.raises(RecipeError, match="bad regex"):
        Rule(targets, "w8", ignore)


def test_rule_validation():
    with pytest.raises(RecipeError, match="at least one target"):
        Rule((), "w8")
    with pytest.raises(RecipeError, match="gptq-turbo"):
        Rule(("Linear",), "w8", method="gptq-turbo")
    with pytest.raises(SchemeError):
        Rule(("Linear",), "w9")
    with pytest.raises(ValueError, match="inside the Recipe"):
        make_recipe(Recipe((rule(["Linear"]),)), targets=["fc"])


def test_plan_is_a_frozen_value():
    p = plan(seq(), make_recipe("w8"))
    assert isinstance(p, Plan)
    with pytest.raises(AttributeError):
        p.layers = {}  # type: ignore[misc]


def test_a_string_target_is_one_target_or_an_error():
    try:
        r = Rule("Linear", "w8")  # type: ignore[arg-type]
    except RecipeError:
        return
    assert r.targets == ("Linear",)


def test_plan_takes_the_same_arguments_as_quantize():
    model = seq()
    assert plan(model, "w8").layers.keys() == plan(model, make_recipe("w8")).layers.keys()
    p = plan(model, "w8", targets=["Linear"], ignore=["0"])
    assert "0" not in p.layers and p.layers  # naming targets also quantizes the head


def test_a_layer_that_fails_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"^2: weight has 1 NaN/Inf values"):
        lowbit.quantize(model, "w8", verbose=False)
    assert all(type(m) is nn.Linear for m in model)  # layer 0 was quantizable, but nothing swapped
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
