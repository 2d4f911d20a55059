"""`apply_blocks`: the block-by-block driver (issue 5 B3) that GPTQ's sequential mode builds on."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowbit.algorithms import ALGORITHMS, LayerStats, rtn
from lowbit.api import make_recipe
from lowbit.apply import apply, apply_blocks
from lowbit.calibrate import collect
from lowbit.errors import QuantizationError
from lowbit.nn import QLinear
from lowbit.recipe import plan


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                         nn.Linear(32, 4))


DATA = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
BLOCKS = [["0"], ["2"], ["4"]]


def test_blocks_see_the_model_as_quantized_so_far():
    model = net()
    p = plan(model, make_recipe("w4g32"))
    seen = []

    def stats_for(names):
        seen.append([type(model.get_submodule(n)).__name__ for n in ("0", "2", "4")])
        return collect(model, DATA, names, stats=("hessian",), progress=False)
    report = apply_blocks(model, p, BLOCKS, stats_for)
    assert seen == [["Linear"] * 3, ["QLinear", "Linear", "Linear"], ["QLinear", "QLinear", "Linear"]]
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    # RTN ignores stats: the result equals one-shot apply
    ref = net()
    apply(ref, plan(ref, make_recipe("w4g32")))
    assert torch.equal(model(DATA[0]), ref(DATA[0]))


def test_stats_reach_the_algorithm(monkeypatch):
    got = {}

    def spy(weight, spec, name, stats=None):
        got[name] = stats
        return rtn(weight, spec, name)
    monkeypatch.setitem(ALGORITHMS, "rtn", spy)
    model = net()
    apply_blocks(model, plan(model, make_recipe("w8")), BLOCKS,
                 lambda names: collect(model, DATA, names, stats=("hessian",), progress=False))
    assert set(got) == {"0", "2", "4"}
    assert all(isinstance(s, LayerStats) and s.samples == 24 for s in got.values())
    assert got["2"].hessian.shape == (64, 64)


def test_failure_in_a_later_block_restores_every_block():
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def stats_for(names):
        if names == ["4"]:
            raise QuantizationError("4: boom")
        return {}
    with pytest.raises(QuantizationError, match="boom"):
        apply_blocks(model, plan(model, make_recipe("w8")), BLOCKS, stats_for)
    assert not any(isinstance(m, QLinear) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_blocks_must_cover_the_plan():
    model = net()
    with pytest.raises(ValueError, match="each planned layer once"):
        apply_blocks(model, plan(model, make_recipe("w8")), [["0"], ["2"]], lambda n: {})
