"""Codebook weights as a weight kind: PQ layers are registered QuantizedModules, save/load round-trip
them with identical outputs, the file's tensor bytes equal `ipq.size_report`, casts keep the
codebook, and a tampered header names the problem."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.apply import swap_modules
from lowbit.errors import FormatError, QuantizationError
from lowbit.ipq import Config
from lowbit.ipq_config import LayerGroup
from lowbit.nn import PQConv2d, PQEmbedding, PQLinear, QuantizedModule, quantized_class
from lowbit.primitives import WEIGHT_KINDS, CodebookWeight


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(60, 16)
        self.conv = torch.nn.Conv2d(2, 4, 2)
        self.fc = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 5)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, ids, img):
        h = self.norm(self.fc(self.emb(ids)))
        return self.out(h).sum(1), self.conv(img)


def config() -> Config:
    return Config((LayerGroup("fc", ("fc", "out"), (), 4, 16), LayerGroup("emb", "emb", (), 8, 32),
                   LayerGroup("conv", "conv", (), 4, 8)), seed=3, n_iter=5)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(60, (3, 7), generator=g), torch.randn(3, 2, 5, 5, generator=g)


def quantized() -> Net:
    torch.manual_seed(0)
    return lowbit.ipq.quantize(Net(), config(), verbose=False)


def test_codebook_is_a_registered_weight_kind():
    assert WEIGHT_KINDS["codebook"] is CodebookWeight
    assert quantized_class(torch.nn.Linear(4, 4), "codebook") is PQLinear
    assert quantized_class(torch.nn.Conv2d(1, 1, 1), "codebook") is PQConv2d
    assert quantized_class(torch.nn.Embedding(2, 4), "codebook") is PQEmbedding
    m = quantized()
    assert all(isinstance(m.get_submodule(n), QuantizedModule) for n in ("emb", "conv", "fc", "out"))
    meta = m.fc.layer_meta()
    assert meta["kind"] == "codebook" and meta["tensors"] == ["centroids", "assignments"]
    assert meta["block_size"] == 4 and meta["shape"] == [16, 16] and meta["method"] == "ipq"


def test_save_load_round_trip_identical_and_size_report_equals_file(tmp_path):
    m = quantized()
    path = lowbit.save(m, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = Net()
    back = lowbit.load(path, skeleton)
    ids, img = inputs()
    with torch.no_grad():
        for a, b in zip(m(ids, img), back(ids, img)):
            assert torch.equal(a, b)
    assert isinstance(back.emb, PQEmbedding) and back.emb.centroids.dtype == torch.float16
    with safe_open(str(path), "pt") as f:
        file_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    report = lowbit.ipq.size_report(m)
    assert report.stored_bytes == file_bytes == lowbit.ipq.size_report(back).stored_bytes
    # fc: 16 centroids of 4 fp16 (128 B) + 16 rows x 4 blocks uint8 (64 B)
    fc = next(r for r in report.layers if r.name == "fc")
    assert (fc.centroid_bytes, fc.assignment_bytes, fc.float_bytes) == (128, 64, 1024)


def test_forward_forms_add_nothing_to_the_file_or_the_size_report(tmp_path):
    """Every PQLinear form's derived state (index tensors, bf16/fp32 centroid copies, the cached
    weight) built before saving: the state dict, the file's tensor bytes and the report stay
    the codebook's."""
    from lowbit.kernels import pq
    m = quantized()
    before = lowbit.ipq.size_report(m).stored_bytes
    ids, img = inputs()
    with torch.no_grad():
        for form in pq.FORMS:
            m.fc.set_form(form), m.out.set_form(form)
            m(ids, img)
    # weight lut bags lutg flat cent32 cent16 rows16 codes_t cent_t
    assert len(m.fc._derived_state) == 10
    assert sorted(m.fc.state_dict()) == ["assignments", "bias", "centroids"]
    path = lowbit.save(m, tmp_path / "f.safetensors")
    with safe_open(str(path), "pt") as f:
        file_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert file_bytes == before == lowbit.ipq.size_report(m).stored_bytes


def test_shared_pq_module_stays_shared_through_the_file(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    m.append(m[0])
    cfg = Config((LayerGroup("all", "Linear", (), 4, 8),), n_iter=3)
    lowbit.ipq.quantize(m, cfg, verbose=False)
    assert m[0] is m[2] and isinstance(m[0], PQLinear)
    back = lowbit.load(lowbit.save(m, tmp_path / "s.safetensors"),
                       torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)))
    assert back[0] is back[2]
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_casts_keep_the_codebook_and_follow_the_compute_dtype():
    m = quantized()
    ids, img = inputs()
    m.to(torch.bfloat16)
    assert m.fc.centroids.dtype == torch.float16 and m.fc.assignments.dtype == torch.uint8
    assert m.emb(ids).dtype == torch.bfloat16
    assert m.fc(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_load_state_dict_into_a_pq_layer_rebuilds_and_checks():
    a, b = quantized(), quantized()
    with torch.no_grad():
        b.fc.centroids.add_(0.5)
    x = torch.randn(4, 16)
    with torch.no_grad():
        a.fc(x)  # derived state built before the load
        a.fc.load_state_dict(b.fc.state_dict())
        assert torch.equal(a.fc(x), b.fc(x))
    bad = dict(b.fc.state_dict(), assignments=torch.zeros(16, 3, dtype=torch.uint8))
    with pytest.raises(Exception, match="assignments"):
        a.fc.load_state_dict(bad)


def test_tampered_codebook_header_is_named(tmp_path):
    m = quantized()
    path = lowbit.save(m, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    doc = json.loads(next(iter(meta.values())))
    assert doc["layers"]["emb"]["kind"] == "codebook" and "spec" not in doc["layers"]["emb"]
    with torch.device("meta"):
        wrong = Net()
    wrong.fc = torch.nn.Linear(16, 8, device="meta")
    with pytest.raises(FormatError, match="'fc'.*shape"):
        lowbit.load(path, wrong)


def test_swap_modules_is_all_or_nothing():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    first = m[0]
    with pytest.raises(QuantizationError, match="no module 'nope'"):
        swap_modules(m, {"0": torch.nn.Identity(), "nope": torch.nn.Identity()})
    assert m[0] is first


def test_golden_codebook_layer_in_a_file(tmp_path):
    """A hand-made 3x4 PQ Linear (k=2 centroids of 2, no bias): its header entry and tensor bytes."""
    cw = CodebookWeight(torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float16),
                        torch.tensor([[0, 1], [1, 1], [1, 0]], dtype=torch.uint8), (3, 4), 2)
    m = torch.nn.Sequential(PQLinear(cw))
    path = lowbit.save(m, tmp_path / "g.safetensors")
    from lowbit.io import read_header
    entry = read_header(path)["layers"]["0"]
    assert entry == {"class": "PQLinear", "kind": "codebook", "format": "codebook", "version": 1,
                     "shape": [3, 4], "block_size": 2, "input": None, "method": "ipq",
                     "sqnr_db": None, "tensors": ["centroids", "assignments"], "dtype": "float32",
                     "aliases": []}
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["0.assignments", "0.centroids"]
        cent = f.get_tensor("0.centroids")
        assign = f.get_tensor("0.assignments")
    # float16 little-endian: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 4.0 = 0x4400
    assert bytes(cent.view(torch.uint8).flatten().tolist()) == bytes.fromhex("003c00c000380044")
    assert bytes(assign.flatten().tolist()) == bytes([0, 1, 1, 1, 1, 0])
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():  # rows: [1,-2,0.5,4], [0.5,4,0.5,4], [0.5,4,1,-2]
        assert torch.equal(m(x), torch.tensor([[3.5, 9.0, 3.5]]))
