"""Quantizing a checkpoint from its safetensors shards (`lowbit.streaming`) writes the very bytes
that loading it whole, `lowbit.quantize` and `lowbit.save` write (RTN; GPTQ with sequential=True),
on tiny random Llama and BERT models saved here in shards; errors name the problem."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.errors import FormatError, RecipeError
from lowbit.api import with_embeddings
from lowbit.streaming import quantize_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def llama_folder(path, tied: bool = True, layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="60KB")
    return path


def bert_folder(path):
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(path)  # one model.safetensors, no index
    return path


def loaded(folder, cls):
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def batches(n: int = 5, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, VOCAB, (1, seq), generator=g)} for _ in range(n)]


def same_files(a, b) -> None:
    for name in ("model.safetensors", "config.json"):
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        assert len(x) == len(y) and x == y, name


def test_rtn_from_shards_writes_the_bytes_of_quantize_and_save(tmp_path):
    src = llama_folder(tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 3  # really sharded
    model = lowbit.quantize(loaded(src, transformers.LlamaForCausalLM), "w4g32", verbose=False)
    lowbit.save(model, tmp_path / "ref")
    quantize_checkpoint(src, "w4g32", tmp_path / "stream", progress=False)
    same_files(tmp_path / "ref", tmp_path / "stream")
    doc = lowbit.io.read_header(tmp_path / "stream")
    assert doc["tied"] == {"model.embed_tokens.weight": "lm_head.weight"}


def test_gptq_from_shards_equals_sequential_gptq_on_the_loaded_model(tmp_path):
    src = llama_folder(tmp_path / "src", tied=False)
    data = batches()
    model = loaded(src, transformers.LlamaForCausalLM)
    lowbit.quantize(model, "w4g32", method="gptq", data=data, sequential=True, verbose=False)
    lowbit.save(model, tmp_path / "ref")
    quantize_checkpoint(src, "w4g32", tmp_path / "stream", method="gptq", data=data, progress=False)
    same_files(tmp_path / "ref", tmp_path / "stream")
    prov = lowbit.io.read_header(tmp_path / "stream")["provenance"]
    assert prov["method"] == "gptq" and prov["sequential"] is True
    assert prov["calibration"]["batches"] == len(data)


def test_gptq_with_embeddings_streams_gptq_linears_and_rtn_embeddings(tmp_path):
    src = llama_folder(tmp_path / "src", tied=False)
    data = batches()
    scheme, targets, ignore, method, options = with_embeddings("w4g32", None, (), "w8r", "gptq")
    model = loaded(src, transformers.LlamaForCausalLM)
    lowbit.quantize(model, scheme, targets=targets, ignore=ignore, method=method, data=data,
                    sequential=True, verbose=False)
    lowbit.save(model, tmp_path / "ref")
    quantize_checkpoint(src, "w4g32", tmp_path / "stream", method="gptq", data=data, embeddings="w8r",
                        progress=False)
    same_files(tmp_path / "ref", tmp_path / "stream")
    prov = lowbit.io.read_header(tmp_path / "stream")["provenance"]
    assert prov["method"] == "gptq" and prov["methods"]["rtn"] == 1 and prov["methods"]["gptq"] > 1


def test_bert_with_quantized_embeddings_matches_and_loads(tmp_path):
    src = bert_folder(tmp_path / "src")
    scheme, targets, ignore, method, _ = with_embeddings("w4g32", None, (), "w8r")
    assert method == "rtn"  # the method rides inside the recipe's rules
    model = lowbit.quantize(loaded(src, transformers.BertModel), scheme, targets=targets, ignore=ignore,
                            verbose=False)
    lowbit.save(model, tmp_path / "ref")
    quantize_checkpoint(src, "w4g32", tmp_path / "stream", embeddings="w8r", progress=False)
    same_files(tmp_path / "ref", tmp_path / "stream")
    back = lowbit.load(tmp_path / "stream")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_gptq_refuses_outside_layers_that_need_calibration(tmp_path):
    """BERT's pooler is a Linear after the blocks: GPTQ on it needs the whole model's forward."""
    src = bert_folder(tmp_path / "src")
    with pytest.raises(RecipeError, match="pooler.dense"):
        quantize_checkpoint(src, "w4g32", tmp_path / "out", method="gptq", data=batches(),
                            targets=["Linear"], progress=False)
    quantize_checkpoint(src, "w4g32", tmp_path / "out", method="gptq", data=batches(),
                        targets=["Linear"], ignore=["pooler.dense"], progress=False)
    assert "pooler.dense" not in lowbit.io.read_header(tmp_path / "out")["layers"]


def test_a_missing_tensor_is_named(tmp_path):
    src = llama_folder(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"].pop("model.norm.weight")
    from safetensors.torch import load_file, save_file
    tensors = {k: v for k, v in load_file(str(shard)).items() if k != "model.norm.weight"}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="'model.norm.weight' is not in the checkpoint"):
        quantize_checkpoint(src, "w4g32", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FormatError, match="no config.json"):
        quantize_checkpoint(tmp_path, "w4g32", tmp_path / "out", progress=False)


def test_cli_stream_writes_the_same_artifact_and_reports_peak_memory(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.models import side_files
    src = llama_folder(tmp_path / "src")
    assert "model.safetensors.index.json" not in side_files(src)  # the float shards' index stays behind
    model = lowbit.quantize(loaded(src, transformers.LlamaForCausalLM), "w4g32", verbose=False)
    lowbit.save(model, tmp_path / "ref", side_files=side_files(src))
    assert main(["quantize", str(src), "--scheme", "w4g32", "--stream", "--out", str(tmp_path / "cli")]) == 0
    same_files(tmp_path / "ref", tmp_path / "cli")
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    assert "peak memory (RSS)" in capsys.readouterr().out
    assert main(["quantize", str(src), "--stream", "--smooth", "0.5", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["quantize", str(src), "--stream", "--group-fallback", "--out", str(tmp_path / "y")]) == 2
    assert "--stream does not take" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_head_less_model_reads_a_checkpoint_with_the_base_prefix(tmp_path):
    """A config without ``architectures`` builds AutoModel (LlamaModel: keys without "model.")
    from a LlamaForCausalLM checkpoint, as from_pretrained does."""
    src = llama_folder(tmp_path / "src", tied=False)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["architectures"]
    (src / "config.json").write_text(json.dumps(cfg))
    model = lowbit.quantize(loaded(src, transformers.AutoModel), "w4g32", verbose=False)
    lowbit.save(model, tmp_path / "ref")
    quantize_checkpoint(src, "w4g32", tmp_path / "stream", progress=False)
    same_files(tmp_path / "ref", tmp_path / "stream")


def test_a_foreign_output_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="refusing to replace"):
        quantize_checkpoint(tmp_path / "no-such-model", "w4g32", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
