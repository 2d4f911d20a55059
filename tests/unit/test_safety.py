"""Regression tests for issue 5 part A: each defect reproduced on the old main, fixed here.

Every test names the defect it pins (A1..A10). Inputs are seeded; tolerances are named.
"""
from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.errors import FormatError, LowbitError, QuantizationError, RecipeError
from lowbit.io import WEIGHTS_NAME
from lowbit.io.format import encode_header, file_sha256
from lowbit.nn import QEmbedding, QLinear

# relative output error of a model whose compute dtype was cast, vs the fp32 quantized model
CAST_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6, torch.float32: 0.0}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 16))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def read_raw(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header, data) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def edit_doc(path, edit, seal: bool = True) -> None:
    """Edit the lowbit header of ``path``; resealed (a crafted file) unless ``seal=False``."""
    header, data = read_raw(path)
    doc = json.loads(header["__metadata__"]["lowbit"])
    edit(doc)
    header["__metadata__"]["lowbit"] = encode_header(doc)["lowbit"] if seal else json.dumps(doc)
    write_raw(path, header, data)


# ---- A1: casts -------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["w4g128", "w8", "w3g128"])
@pytest.mark.parametrize("cast", ["float", "half", "double", "bfloat16"])
def test_A1_cast_keeps_codes_and_follows_dtype(scheme, cast):
    m = lowbit.quantize(mlp(), scheme, targets=["Linear"], verbose=False)
    x = torch.randn(3, 256, generator=gen())
    ref = m(x)
    codes = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith("bias")}
    dtype = {"float": torch.float32, "half": torch.float16, "double": torch.float64,
             "bfloat16": torch.bfloat16}[cast]
    m = getattr(m, cast)() if cast != "bfloat16" else m.to(torch.bfloat16)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, ref) <= CAST_TOLERANCE[dtype] + 1e-2 * (dtype in (torch.float16, torch.bfloat16))
    for k, v in m.state_dict().items():  # codes and quantization parameters untouched
        if k in codes:
            assert v.dtype == codes[k].dtype and torch.equal(v, codes[k]), k
    assert m[0].bias.dtype == dtype  # float parts cast as usual


def test_A1_cast_model_saves_and_loads(tmp_path):
    m = lowbit.quantize(mlp(), "w4g128-sfloat32", targets=["Linear"], verbose=False).to(torch.bfloat16)
    x = torch.randn(4, 256, generator=gen()).to(torch.bfloat16)
    lowbit.save(m, tmp_path)
    loaded = lowbit.load(tmp_path, mlp())
    assert torch.equal(loaded(x), m(x))
    assert loaded[0].bias.dtype == torch.bfloat16


def test_A1_qembedding_output_follows_cast(tmp_path):
    m = lowbit.quantize(nn.Sequential(nn.Embedding(50, 32)), "w8r", targets=["Embedding"], verbose=False)
    ids = torch.tensor([[1, 2, 49]])
    ref = m(ids)
    m = m.half()
    assert m(ids).dtype == torch.float16
    assert rel_err(m(ids), ref) < 1e-3
    lowbit.save(m, tmp_path)
    assert lowbit.load(tmp_path, nn.Sequential(nn.Embedding(50, 32)))(ids).dtype == torch.float16


# ---- A2: load_state_dict rebuilds derived state ----------------------------------------------

@pytest.mark.parametrize("scheme", ["w4g128", "w8"])
@pytest.mark.parametrize("rows", [1, 100])
@pytest.mark.parametrize("assign", [False, True])
def test_A2_load_state_dict_rebuilds_kernel_state(scheme, rows, assign):
    src = lowbit.quantize(mlp(0), scheme, targets=["Linear"], verbose=False)
    dst = lowbit.quantize(mlp(1), scheme, targets=["Linear"], verbose=False)
    x = torch.randn(rows, 256, generator=gen(rows))
    assert not torch.equal(dst(x), src(x))
    dst.load_state_dict(src.state_dict(), assign=assign)
    assert torch.equal(dst(x), src(x))


def test_A2_load_state_dict_rejects_bad_values():
    src = lowbit.quantize(mlp(0), "w8", targets=["Linear"], verbose=False)
    state = src.state_dict()
    state["0.scale"] = -state["0.scale"]
    with pytest.raises(QuantizationError, match=r"0\.scale.*finite and > 0"):
        lowbit.quantize(mlp(1), "w8", targets=["Linear"], verbose=False).load_state_dict(state)


# ---- A3: a float tensor named like a quantized one survives ----------------------------------

class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.post = nn.Module()
        self.post.qdata = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.proj(x) * self.scale + self.post.qdata.sum()


def test_A3_float_params_named_scale_or_qdata_load(tmp_path):
    m = Scaled()
    with torch.no_grad():
        m.scale.fill_(7.0)
        m.post.qdata.fill_(2.0)
    lowbit.quantize(m, "w8", targets=["proj"], verbose=False)
    lowbit.save(m, tmp_path)
    loaded = lowbit.load(tmp_path, Scaled())
    assert loaded.scale.item() == 7.0 and torch.equal(loaded.post.qdata, torch.full((3,), 2.0))
    x = torch.randn(2, 64, generator=gen())
    assert torch.equal(loaded(x), m(x))


# ---- A4: quantizing nothing is an error ------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="w4g1024"), "not divisible by group_size 1024"),
    (dict(scheme="w8", targets=["linear"]), r"did you mean \['Linear'\]"),
    (dict(scheme="w8", targets=["0.wieght"]), "match no module"),
    (dict(scheme="w8", targets=[]), "targets is empty"),
    (dict(scheme="w4g32a8"), "int8 inputs need 8-bit symmetric per-channel weights"),
])
def test_A4_quantizing_nothing_raises_and_leaves_the_model(kwargs, match):
    m = mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RecipeError, match=match):
        lowbit.quantize(m, verbose=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(x, QLinear) for x in m.modules())


def test_A4_allow_empty_returns_the_model_unchanged():
    m = mlp()
    out = lowbit.quantize(m, "w4g1024", allow_empty=True, verbose=False)
    assert out is m and len(m.lowbit_report.layers) == 0
    assert sorted(m.lowbit_report.skipped) == ["0", "2", "4"]  # two not divisible, one output head


# ---- A6: malformed input -> lowbit errors ---------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda: lowbit.quantize(mlp(), "w8", targets=[None]), RecipeError, "non-empty strings"),
    (lambda: lowbit.quantize(mlp(), "w8", targets=[3]), RecipeError, "found 3"),
    (lambda: lowbit.quantize(None, "w8"), RecipeError, "found NoneType"),
    (lambda: lowbit.quantize(mlp(), None), LowbitError, "non-empty string"),
    (lambda: lowbit.save(None, "x"), LowbitError, "found NoneType"),
    (lambda: lowbit.load(None), FormatError, "found NoneType"),
    (lambda: lowbit.Recipe.from_json("[" * 100000), RecipeError, "JSON"),
])
def test_A6_malformed_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_A6_meta_model_raises_naming_the_layer():
    with torch.device("meta"):
        m = mlp()
    with pytest.raises(QuantizationError, match=r"^0: weights are on the meta device"):
        lowbit.quantize(m, "w8", targets=["Linear"], verbose=False)


@pytest.fixture
def saved_mlp(tmp_path):
    m = lowbit.quantize(mlp(), "w4g128", targets=["Linear"], verbose=False)
    return m, lowbit.save(m, tmp_path / "art")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(layers=[1, 2]), "'layers' must be a dict"),
    (lambda d: d["layers"]["0"].pop("shape"), "'shape' must be a list"),
    (lambda d: d["layers"]["0"].update(shape=[128, "x"]), "shape must be positive integers"),
    (lambda d: d["layers"]["0"].update(tensors=["qdata", "scale"]), "lists tensors"),
    (lambda d: d.update(tied="oops"), "'tied' must be a dict"),
    (lambda d: d["layers"]["0"].update(dtype="int8"), "dtype must be one of"),
    (lambda d: d["layers"]["0"].update(kind="lattice"), "unknown weight kind"),
    (lambda d: d["layers"]["0"].update({"class": "QEmbedding"}), "is a QEmbedding in the file"),
])
def test_A6_malformed_header_fields(saved_mlp, edit, match):
    _, path = saved_mlp
    edit_doc(path, edit)
    with pytest.raises(FormatError, match=match):
        lowbit.load(path, mlp())


def test_A6_deeply_nested_header(saved_mlp):
    _, path = saved_mlp
    header, data = read_raw(path)
    header["__metadata__"]["lowbit"] = "[" * 100000 + "]" * 100000
    write_raw(path, header, data)
    with pytest.raises(FormatError, match="not valid JSON|must be a JSON object"):
        lowbit.load(path, mlp())


# ---- A7: the whole artifact is sealed; values validated --------------------------------------

@pytest.mark.parametrize("edit", [
    lambda d: d["layers"]["0"]["spec"].update(symmetric=True),
    lambda d: d.update(tied={"4.weight": "0.qdata"}),
    lambda d: d.update(packing_version=99),
    lambda d: d["provenance"].update(scheme="w8"),
])
def test_A7_any_header_edit_breaks_the_seal(saved_mlp, edit):
    _, path = saved_mlp
    edit_doc(path, edit, seal=False)
    with pytest.raises(FormatError, match="header_sha256"):
        lowbit.load(path, mlp())


def test_A7_sealed_but_inconsistent_edits_are_still_caught(saved_mlp):
    _, path = saved_mlp
    edit_doc(path, lambda d: d.update(packing_version=99))
    with pytest.raises(FormatError, match="packing_version 99"):
        lowbit.load(path, mlp())


@pytest.mark.parametrize("scheme,key,value,match", [
    ("w4g128", "0.scale", float("nan"), "finite and > 0"),
    ("w4g128", "0.scale", -1.0, "finite and > 0"),
    ("w4g128", "0.zero_point", 200, r"integer zero points must lie in \[0, 15\], found 200"),
    ("w4g128-zfloat", "0.zero_point", float("inf"), "zero points must be finite"),
])
def test_A7_bad_values_with_a_valid_checksum(tmp_path, scheme, key, value, match):
    import safetensors.torch
    from lowbit.io.format import tensors_sha256
    path = lowbit.save(lowbit.quantize(mlp(), scheme, targets=["Linear"], verbose=False), tmp_path / "a")
    header, _ = read_raw(path)
    doc = json.loads(header["__metadata__"]["lowbit"])
    tensors = safetensors.torch.load_file(str(path))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[5] = value
    doc["tensors_sha256"] = tensors_sha256(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=encode_header(doc))
    with pytest.raises(FormatError, match=match):
        lowbit.load(path, mlp())


def test_A7_symmetric_codes_out_of_range(tmp_path):
    import safetensors.torch
    from lowbit.io.format import tensors_sha256
    m = lowbit.quantize(mlp(), "w8", targets=["Linear"], verbose=False)
    path = lowbit.save(m, tmp_path)
    header, _ = read_raw(path)
    doc = json.loads(header["__metadata__"]["lowbit"])
    tensors = safetensors.torch.load_file(str(path))
    tensors["2.qdata"] = tensors["2.qdata"].clone()
    tensors["2.qdata"][0, 0] = 0  # symmetric 8-bit codes are 1..255
    doc["tensors_sha256"] = tensors_sha256(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=encode_header(doc))
    with pytest.raises(FormatError, match=r"2\.qdata: codes must lie in \[1, 255\]"):
        lowbit.load(path, mlp())


# ---- A8: saving a folder is atomic as a whole ------------------------------------------------

def test_A8_failed_weights_write_keeps_the_whole_old_folder(tmp_path, monkeypatch):
    from lowbit.io import serialize
    folder = tmp_path / "art"
    old = lowbit.quantize(mlp(0), "w8", targets=["Linear"], verbose=False)
    lowbit.save(old, folder, side_files={"notes.txt": _text(tmp_path, "old")})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(serialize, "save_file", broken)
    new = lowbit.quantize(mlp(1), "w8", targets=["Linear"], verbose=False)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(new, folder, side_files={"notes.txt": _text(tmp_path, "new")})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".lowbit-tmp-" in p.name]


def _text(tmp_path, text: str):
    p = tmp_path / f"src-{text}.txt"
    p.write_text(text)
    return p


def test_A8_side_files_are_sealed(tmp_path):
    folder = tmp_path / "art"
    m = lowbit.quantize(mlp(0), "w8", targets=["Linear"], verbose=False)
    lowbit.save(m, folder, side_files={"tok/vocab.txt": _text(tmp_path, "a b c")})
    assert lowbit.io.read_header(folder)["files"]["tok/vocab.txt"] == file_sha256(folder / "tok/vocab.txt")
    (folder / "tok/vocab.txt").write_text("a b d")
    with pytest.raises(FormatError, match="'tok/vocab.txt' does not match"):
        lowbit.load(folder, mlp())
    (folder / "tok/vocab.txt").unlink()
    with pytest.raises(FormatError, match="'tok/vocab.txt' listed in the header is missing"):
        lowbit.load(folder, mlp())


def test_A8_refuses_to_overwrite_a_regular_file_or_a_foreign_folder(tmp_path):
    m = lowbit.quantize(mlp(0), "w8", targets=["Linear"], verbose=False)
    f = tmp_path / "precious"
    f.write_text("keep me")
    with pytest.raises(FormatError, match="exists and is not a folder"):
        lowbit.save(m, f)
    assert f.read_text() == "keep me"
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("keep me too")
    with pytest.raises(FormatError, match="files that lowbit did not write"):
        lowbit.save(m, d)
    assert (d / "thesis.tex").read_text() == "keep me too"


def test_A8_modes_follow_the_umask_and_stale_temps_are_cleaned(tmp_path):
    m = lowbit.quantize(mlp(0), "w8", targets=["Linear"], verbose=False)
    stale = tmp_path / ".art.lowbit-tmp-999999999"  # a pid that cannot be alive
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"half")
    old = os.umask(0o022)
    try:
        path = lowbit.save(m, tmp_path / "art")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "art").stat().st_mode & 0o777) == oct(0o755)
    assert not stale.exists()


# ---- A9: shared modules and hooks ------------------------------------------------------------

def test_A9_shared_module_stays_shared(tmp_path):
    lin = nn.Linear(64, 64)
    m = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(64, 8))
    lowbit.quantize(m, "w8", targets=["0", "3"], verbose=False)
    assert m[0] is m[2] and isinstance(m[0], QLinear)
    assert m.lowbit_report.aliases == {"2": "0"}
    x = torch.randn(2, 64, generator=gen())
    lowbit.save(m, tmp_path)
    lin2 = nn.Linear(64, 64)
    loaded = lowbit.load(tmp_path, nn.Sequential(lin2, nn.ReLU(), lin2, nn.Linear(64, 8)))
    assert loaded[0] is loaded[2] and torch.equal(loaded(x), m(x))


def test_A9_forward_hooks_are_carried_and_removable():
    m = mlp()
    seen = []
    h1 = m[0].register_forward_hook(lambda mod, i, o: seen.append(("post", type(mod).__name__)))
    m[0].register_forward_pre_hook(lambda mod, i: seen.append(("pre", type(mod).__name__)))
    lowbit.quantize(m, "w8", targets=["Linear"], verbose=False)
    m(torch.randn(1, 256))
    assert seen == [("pre", "QLinear"), ("post", "QLinear")]
    h1.remove()
    seen.clear()
    m(torch.randn(1, 256))
    assert seen == [("pre", "QLinear")]


def test_A9_hooks_that_cannot_be_carried_are_named():
    m = mlp()
    m[2].register_full_backward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="^2: backward_hooks hook"):
        lowbit.quantize(m, "w8", targets=["Linear"], verbose=False)
    assert any("2: backward_hooks" in w for w in m.lowbit_report.warnings)


# ---- A10: smaller ones -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 50, 1000])
def test_A10_qembedding_rejects_out_of_range_ids(bad):
    m = lowbit.quantize(nn.Sequential(nn.Embedding(50, 32)), "w8r", targets=["Embedding"], verbose=False)
    with pytest.raises(IndexError, match=f"index {bad} is out of range"):
        m(torch.tensor([0, bad]))
    with pytest.raises(IndexError):  # as nn.Embedding does
        nn.Embedding(50, 32)(torch.tensor([bad]))


def test_A10_tiny_weights_warn_about_float16_underflow():
    w = torch.full((4, 32), 1e-30)
    with pytest.warns(UserWarning, match=r"underflow float16 scales.*-sfloat32"):
        lowbit.quantize_weight(w, lowbit.parse_scheme("w8"), "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qw = lowbit.quantize_weight(w, lowbit.parse_scheme("w8-sfloat32"), "tiny")
    assert (qw.dequantize() - w).abs().max() / 1e-30 < 0.01


def test_A10_cli_inspect_of_a_malformed_file_is_a_clean_error(saved_mlp, capsys):
    from lowbit.cli import main
    _, path = saved_mlp
    edit_doc(path, lambda d: d["layers"]["0"].pop("shape"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'shape' must be a list" in err and "Traceback" not in err


def test_A10_cli_quantize_checks_out_before_working(tmp_path, capsys):
    from lowbit.cli import main
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["quantize", "no-such-model", "--out", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [[], {}, 3])
def test_a_layer_kind_that_is_not_a_name_is_a_format_error(kind):
    """Found by the file fuzzer: ``"kind": []`` raised TypeError (an unhashable lookup) instead of
    naming the field."""
    from lowbit.io.schema import check_header
    entry = {"class": "QLinear", "kind": kind, "shape": [16, 32], "method": "rtn", "dtype": "float32",
             "tensors": ["qdata", "scale"], "aliases": [], "spec": {}}
    doc = {"layers": {"0": entry}, "tied": {}, "tensors_sha256": "0" * 64, "format_version": 2,
           "packing_version": 1, "model": {}, "nonpersistent": [], "files": {}, "provenance": {}}
    with pytest.raises(FormatError, match="layer '0': field 'kind' must be a str"):
        check_header(doc, "f.safetensors")
