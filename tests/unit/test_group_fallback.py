"""`Recipe.group_fallback`: a layer whose input width the rule's group does not divide takes the
largest power-of-two group below it that does (>= 16) instead of being skipped; off by default."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import Recipe, RecipeError, make_recipe, plan
from lowbit.nn import QLinear


def model() -> nn.Sequential:
    torch.manual_seed(0)
    # inputs: 576 (g128 -> g64), 256 (g128 divides), 200 (g128 -> g8 < 16: skipped), 96 (head)
    return nn.Sequential(nn.Linear(576, 256), nn.Linear(256, 200), nn.Linear(200, 96),
                         nn.Linear(96, 10))


def test_off_by_default_skips_as_before():
    p = plan(model(), make_recipe("w4g128"))
    assert sorted(p.layers) == ["1"] and p.fallbacks == {}
    assert "576 input columns are not divisible by group_size 128" in p.skipped["0"]


def test_fallback_takes_the_largest_power_of_two_group_that_divides():
    p = plan(model(), make_recipe("w4g128", group_fallback=True))
    assert p.layers["0"].spec.group_size == 64  # 576 = 9 x 64
    assert p.layers["1"].spec.group_size == 128  # unchanged where 128 divides
    assert "2" not in p.layers and "not divisible" in p.skipped["2"]  # 200: 8 is below 16
    assert "3" in p.skipped and "output head" in p.skipped["3"]  # the head stays float regardless
    assert p.fallbacks == {"0": "group 64: 128 does not divide its 576 input columns"}
    assert "0: w4g64 (rtn) [group 64: 128 does not divide its 576 input columns]" in str(p)
    # the rule's other fields stay: bits, symmetry, zero point, method
    assert p.layers["0"].spec.bits == 4 and p.layers["0"].spec.symmetric is False


@pytest.mark.parametrize("scheme,cols,want", [("w4g96", 640, 64), ("w4g64", 48, 16), ("w8g256", 640, 128),
                                              ("w4g32", 40, None), ("w3g128", 384, 128)])
def test_fallback_groups(scheme, cols, want):
    m = nn.Sequential(nn.Linear(cols, 8), nn.Linear(8, 2))
    p = plan(m, make_recipe(scheme, group_fallback=True), allow_empty=True)
    got = p.layers["0"].spec.group_size if "0" in p.layers else None
    assert got == want


def test_quantized_model_saves_and_loads_with_mixed_groups(tmp_path):
    m = model()
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(x)
    lowbit.quantize(m, "w4g128", group_fallback=True, verbose=False)
    assert isinstance(m[0], QLinear) and m[0].qweight.spec.group_size == 64
    assert m[1].qweight.spec.group_size == 128 and isinstance(m[2], nn.Linear)
    assert m.lowbit_report.fallbacks == {"0": "group 64: 128 does not divide its 576 input columns"}
    assert "0: group 64: 128 does not divide" in str(m.lowbit_report)
    with torch.no_grad():
        y = m(x)
    assert (y - want).norm() / want.norm() < 0.08  # two 4-bit layers on random weights: 0.051 here
    path = lowbit.save(m, tmp_path / "m.safetensors")
    back = lowbit.load(path, model())
    assert back[0].qweight.spec.group_size == 64
    with torch.no_grad():
        assert torch.equal(back(x), y)


def test_recipe_json_round_trip_and_validation():
    r = make_recipe("w4g128", group_fallback=True)
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_json(make_recipe("w4g128").to_json()).group_fallback is False
    with pytest.raises(RecipeError, match="group_fallback must be True or False"):
        Recipe(r.rules, group_fallback="yes")
