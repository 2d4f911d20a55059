"""lowbit inside transformers (`lowbit.hf`) on a tiny BertModel built from a config (no downloads):
load-time quantization gives `lowbit.quantize`'s codes; `from_pretrained` of a saved folder gives
`lowbit.load`'s outputs; save_pretrained writes lowbit's format; sharded checkpoints both ways;
errors name the problem; importing `lowbit` registers nothing."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="lowbit.hf needs transformers (pip install -e '.[hf]')")

import lowbit  # noqa: E402
import lowbit.hf  # noqa: E402
from lowbit.errors import FormatError, RecipeError  # noqa: E402

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
RECIPE = lowbit.Recipe((lowbit.Rule(("Linear",), "w4g32"), lowbit.Rule(("Embedding",), "w8r")))


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    tiny_bert().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A folder written by lowbit.save (what `lowbit quantize` writes)."""
    d = tmp_path_factory.mktemp("lowbit") / "m"
    lowbit.save(lowbit.quantize(tiny_bert(), RECIPE, verbose=False), d)
    return d


def out(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_load_time_quantization_gives_quantize_codes(fp32_dir, ids):
    want = lowbit.quantize(tiny_bert(), RECIPE, verbose=False)
    got = transformers.AutoModel.from_pretrained(fp32_dir, quantization_config=lowbit.hf.LowbitConfig(RECIPE))
    assert_same_state(want, got)
    assert type(got.embeddings.word_embeddings).__name__ == "QEmbedding"
    assert torch.equal(out(want, ids), out(got, ids))
    assert len(got.lowbit_report.layers) == len(want.lowbit_report.layers) == 15  # 12 Linears + 3 tables


def test_saved_folder_loads_as_lowbit_load_does(saved_dir, ids):
    want = lowbit.load(saved_dir)
    got = transformers.AutoModel.from_pretrained(saved_dir)
    assert_same_state(want, got)
    assert torch.equal(out(want, ids), out(got, ids))
    assert got.lowbit_source["scheme"] == want.lowbit_source["scheme"]


def test_codes_and_scales_are_never_cast(saved_dir, ids):
    want = lowbit.load(saved_dir)
    got = transformers.AutoModel.from_pretrained(saved_dir, dtype=torch.bfloat16)
    q = got.encoder.layer[0].intermediate.dense
    assert q.qdata.dtype == torch.uint8 and q.scale.dtype == torch.float16
    assert got.encoder.layer[0].output.LayerNorm.weight.dtype == torch.bfloat16
    w = want.encoder.layer[0].intermediate.dense
    assert torch.equal(q.qdata, w.qdata) and torch.equal(q.scale, w.scale)


def test_save_pretrained_writes_lowbit_format(saved_dir, tmp_path, ids):
    model = transformers.AutoModel.from_pretrained(saved_dir)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit"
    assert lowbit.hf.LowbitConfig.from_dict(config["quantization_config"]).recipe() == RECIPE
    header = lowbit.io.read_header(tmp_path)
    assert len(header["layers"]) == 15 and header["format_version"] == 2
    ref = out(lowbit.load(saved_dir), ids)
    assert torch.equal(out(lowbit.load(tmp_path), ids), ref)
    assert torch.equal(out(transformers.AutoModel.from_pretrained(tmp_path), ids), ref)


def test_sharded_both_ways(saved_dir, fp32_dir, tmp_path, ids):
    model = transformers.AutoModel.from_pretrained(saved_dir)
    model.save_pretrained(tmp_path / "q", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    again = transformers.AutoModel.from_pretrained(tmp_path / "q")
    ref = out(lowbit.load(saved_dir), ids)
    assert torch.equal(out(again, ids), ref)
    assert torch.equal(out(lowbit.load(tmp_path / "q"), ids), ref)  # lowbit.load reads shards too
    tiny_bert().save_pretrained(tmp_path / "f", max_shard_size="60KB")
    assert len(list((tmp_path / "f").glob("model-*.safetensors"))) >= 2
    got = transformers.AutoModel.from_pretrained(tmp_path / "f", quantization_config=lowbit.hf.LowbitConfig(RECIPE))
    assert_same_state(lowbit.quantize(tiny_bert(), RECIPE, verbose=False), got)


def test_config_round_trips_through_config_json(tmp_path):
    for cfg in (lowbit.hf.LowbitConfig("w4g128", targets=["Linear"], ignore="pooler.dense"),
                lowbit.hf.LowbitConfig(RECIPE), lowbit.hf.LowbitConfig(RECIPE.to_json())):
        bert = transformers.BertConfig(quantization_config=cfg.to_dict())
        bert.save_pretrained(tmp_path)
        back = transformers.AutoConfig.from_pretrained(tmp_path).quantization_config
        again = transformers.quantizers.auto.AutoQuantizationConfig.from_dict(back)
        assert isinstance(again, lowbit.hf.LowbitConfig)
        assert again.to_dict() == cfg.to_dict() and again.recipe() == cfg.recipe()


def test_config_that_matches_nothing_names_the_targets(fp32_dir):
    with pytest.raises(RecipeError, match=r"\['linear'\] match no module"):
        transformers.AutoModel.from_pretrained(
            fp32_dir, quantization_config=lowbit.hf.LowbitConfig("w4g32", targets=["linear"]))
    with pytest.raises(RecipeError, match="unknown field"):
        lowbit.hf.LowbitConfig("w4g32", group_size=32)


def test_edited_config_json_is_refused(saved_dir, tmp_path):
    import shutil
    d = tmp_path / "edited"
    shutil.copytree(saved_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["hidden_act"] = "relu"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="config.json"):
        transformers.AutoModel.from_pretrained(d)


def test_edited_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    d = tmp_path / "m"
    lowbit.save(lowbit.quantize(tiny_bert(), RECIPE, verbose=False), d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(d / "model.safetensors")
    tensors["encoder.layer.1.output.dense.scale"][0, 0] *= 2
    save_file(tensors, d / "model.safetensors", metadata=meta)
    with pytest.raises(FormatError, match="does not match the checksum"):
        transformers.AutoModel.from_pretrained(d)


def test_import_lowbit_registers_nothing_and_unregistered_load_warns(saved_dir):
    script = textwrap.dedent(f"""
        import io, logging, sys
        import transformers
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        import lowbit
        print("after lowbit", "lowbit" in AUTO_QUANTIZER_MAPPING)
        transformers.AutoModel.from_pretrained({str(saved_dir)!r})
        import lowbit.hf
        print("after lowbit.hf", "lowbit" in AUTO_QUANTIZER_MAPPING)
    """)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after lowbit False" in proc.stdout and "after lowbit.hf True" in proc.stdout
    assert "Unknown quantization type, got lowbit" in proc.stderr


def test_device_map_off_the_cpu_is_refused(fp32_dir):
    with pytest.raises(ValueError, match="lowbit runs on the CPU"):
        transformers.AutoModel.from_pretrained(fp32_dir, device_map={"": "cuda:0"},
                                               quantization_config=lowbit.hf.LowbitConfig("w4g32"))
