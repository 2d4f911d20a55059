"""Issue 5 A7/A8 for transformers models: the config is part of the sealed artifact, and a model
is rebuilt on the meta device, so a crafted config cannot make `load` allocate before it fails."""
from __future__ import annotations

import json
import resource
import struct

import pytest
import torch

import lowbit
from lowbit.errors import FormatError
from lowbit.io.format import encode_header, file_sha256

transformers = pytest.importorskip("transformers", reason="needs transformers (extra 'hf')")


def tiny_bert():
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture
def saved(tmp_path):
    m = lowbit.quantize(tiny_bert(), "w4g32", verbose=False)
    lowbit.save(m, tmp_path / "art")
    return m, tmp_path / "art"


def inputs():
    return {"input_ids": torch.tensor([[2, 7, 30, 98, 4]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_rebuilt_from_header_equals_saved(saved):
    m, folder = saved
    loaded = lowbit.load(folder)
    assert type(loaded).__name__ == "BertModel"
    assert torch.equal(loaded(**inputs()).last_hidden_state, m(**inputs()).last_hidden_state)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_edited_config_json_is_refused(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="side file 'config.json' does not match"):
        lowbit.load(folder)


def reseal(folder, edit_doc):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    doc = json.loads(header["__metadata__"]["lowbit"])
    edit_doc(doc)
    header["__metadata__"]["lowbit"] = encode_header(doc)["lowbit"]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_crafted_huge_vocab_fails_before_allocating(saved):
    """vocab_size 2**33 x 32 floats = 1 TiB if anything were built for real; under a 1 GiB
    address-space headroom the load must fail by a shape check, not by MemoryError."""
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 2 ** 33
    (folder / "config.json").write_text(json.dumps(cfg))

    def edit(doc):
        doc["model"]["config"]["vocab_size"] = 2 ** 33
        doc["files"]["config.json"] = file_sha256(folder / "config.json")
    reseal(folder, edit)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
    try:
        with pytest.raises(FormatError, match="word_embeddings.weight"):
            lowbit.load(folder)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_single_file_artifact_carries_its_config(saved, tmp_path):
    m, _ = saved
    path = lowbit.save(m, tmp_path / "one.safetensors")
    loaded = lowbit.load(path)
    assert torch.equal(loaded(**inputs()).last_hidden_state, m(**inputs()).last_hidden_state)
