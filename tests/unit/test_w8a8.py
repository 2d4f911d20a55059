"""w8a8 (dynamic, per-token int8 inputs) and w8a8-static (calibrated per-tensor int8 inputs):
quality on a seeded model, the static grid from calibration, save -> load, every path used."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import FormatError, QuantizationError
from lowbit.io import read_header
from lowbit.nn import QConv2dA8, QLinear, QLinearA8
from lowbit.primitives.tokens import static_input_params

# relative output error vs the float model on in-distribution inputs (measured: dynamic 0.008,
# static 0.010 on this MLP)
DYNAMIC_REL_ERR = 0.02
STATIC_REL_ERR = 0.03


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 4))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=g) for _ in range(n)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme,budget", [("w8a8", DYNAMIC_REL_ERR), ("w8a8-static", STATIC_REL_ERR)])
def test_quality_and_round_trip(scheme, budget, tmp_path):
    m = mlp()
    x = batches(1, seed=9)[0]
    ref = m(x)
    q = lowbit.quantize(copy.deepcopy(m), scheme, data=batches(), verbose=False)
    assert isinstance(q[0], QLinearA8) and isinstance(q[2], QLinearA8) and isinstance(q[3], nn.Linear)
    assert rel(q(x), ref) < budget
    lowbit.save(q, tmp_path)
    loaded = lowbit.load(tmp_path, mlp())
    assert torch.equal(loaded(x), q(x))
    entry = read_header(tmp_path)["layers"]["0"]
    assert entry["class"] == "QLinearA8" and entry["input"]["static"] == (scheme == "w8a8-static")
    assert (entry["input_params"] is None) == (scheme == "w8a8")


def test_static_grid_comes_from_the_calibrated_range():
    m = mlp()
    data = batches()
    q = lowbit.quantize(copy.deepcopy(m), "w8a8-static", data=data, observer="minmax", verbose=False)
    lo = min(float(b.min()) for b in data)
    hi = max(float(b.max()) for b in data)
    assert q[0].input_params == static_input_params(lo, hi)
    assert q[0].input_params["zero_point"] == round(q[0].input_params["zero_point"])  # 0.0 exact


def test_static_inputs_default_to_the_histogram_observer():
    from lowbit.spec import STATIC_OBSERVER, ActSpec, parse
    assert STATIC_OBSERVER == "histogram"
    assert parse("w8a8-static").input.observer == "histogram"
    assert parse("w8a8").input.observer == "minmax"  # unused by dynamic inputs
    assert ActSpec(static=True, granularity="tensor").observer == "histogram"
    explicit = ActSpec(static=True, granularity="tensor", observer="minmax")
    assert ActSpec.from_dict(explicit.to_dict()) == explicit  # files that name minmax keep it
    q = lowbit.quantize(mlp(), "w8a8-static", data=batches(), verbose=False)
    assert q[0].input_spec.observer == "histogram"


@pytest.mark.parametrize("path", ["w8a8", "int8mm"])
def test_dynamic_paths_agree_with_the_float_layer(path):
    m = mlp()
    q = lowbit.quantize(copy.deepcopy(m), "w8a8", verbose=False)
    q[0].set_path(path)
    x = batches(1, seed=3)[0]
    assert rel(q[0](x), m[0](x)) < DYNAMIC_REL_ERR
    with pytest.raises(ValueError, match="not available"):
        q[0].set_path("int4mm")


def test_static_needs_data_and_valid_params(tmp_path):
    with pytest.raises(lowbit.RecipeError, match="calibration data needed"):
        lowbit.quantize(mlp(), "w8a8-static", verbose=False)
    q = lowbit.quantize(mlp(), "w8a8-static", data=batches(), verbose=False)
    with pytest.raises(QuantizationError, match="bad static input parameters"):
        QLinearA8(q[0].qweight, None, input_spec=q[0].input_spec, input_params={"scale": -1.0, "zero_point": 3})
    lowbit.save(q, tmp_path)
    import json
    import struct
    from lowbit.io.format import encode_header
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    doc = json.loads(header["__metadata__"]["lowbit"])
    doc["layers"]["0"]["input_params"] = {"scale": 0.1, "zero_point": 999}
    header["__metadata__"]["lowbit"] = encode_header(doc)["lowbit"]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(FormatError, match="bad static input parameters"):
        lowbit.load(tmp_path, mlp())


def test_mixed_recipe_weight_only_and_int8_inputs():
    m = mlp()
    recipe = lowbit.Recipe((lowbit.Rule(("Linear",), "w4g32"), lowbit.Rule(("2",), "w8a8")))
    q = lowbit.quantize(m, recipe, verbose=False)
    assert type(q[0]) is QLinear and type(q[2]) is QLinearA8


def test_static_conv2d_matches_float_within_budget(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2),
                        nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    x = data[0]
    ref = net(x)
    q = lowbit.quantize(copy.deepcopy(net), "w8a8-static", targets=["Conv2d"], data=data, verbose=False)
    assert isinstance(q[0], QConv2dA8) and isinstance(q[2], QConv2dA8)
    assert rel(q(x), ref) < STATIC_REL_ERR
    lowbit.save(q, tmp_path)
    loaded = lowbit.load(tmp_path, copy.deepcopy(net))
    assert torch.equal(loaded(x), q(x))


def test_lowbit_kernels_command(tmp_path, monkeypatch, capsys):
    """`lowbit kernels` names the CPU and lists the decisions cached (here: after one timed layer)."""
    from lowbit.cli import main
    from lowbit.kernels.select import KernelSelector
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LOWBIT_KERNEL")
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "no decisions cached yet" in out
    q = lowbit.quantize(mlp(), "w8a8", verbose=False)
    q[0].selector = KernelSelector(cache_dir=tmp_path, budget_s=0.01)
    q[0].path_for(1)
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "a8/w8g0/128x64" in out and "fp32" in out
    assert main(["kernels", "--refresh"]) == 0
    assert "no decisions cached yet" in capsys.readouterr().out
