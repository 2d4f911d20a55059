"""lowbit.ipq.quantize: stages in config order with the user's finetune between them (centroids
trainable only then), seeded, errors that name a stage matching nothing."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.ipq import Config
from lowbit.ipq_config import IPQConfigError, LayerGroup
from lowbit.nn import PQEmbedding, PQLinear


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(40, 16),
                                "ffn": torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)),
                                "attn": torch.nn.Linear(16, 16), "odd": torch.nn.Linear(10, 16)})


def config() -> Config:
    return Config((LayerGroup("ffn", "re:ffn\\..*", (), 8, 16), LayerGroup("emb", "emb", (), 4, 16),
                   LayerGroup("attn", ("attn", "odd"), (), 8, 8)), seed=1, n_iter=4)


def test_stages_run_in_order_with_finetune_between():
    seen = []

    def finetune(m):
        pq = sorted(n for n, x in m.named_modules() if isinstance(x, (PQLinear, PQEmbedding)))
        trainable = sorted(n.rsplit(".", 1)[0] for n, p in m.named_parameters()
                           if p.requires_grad and n.endswith("centroids"))
        assert trainable == pq  # every PQ layer so far, and only then
        assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n.endswith("centroids"))
        seen.append(pq)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        opt.zero_grad()
        m["ffn"](m["emb"](torch.arange(40))).square().mean().backward()
        opt.step()

    m = lowbit.ipq.quantize(model(), config(), finetune=finetune, verbose=False)
    assert seen == [["ffn.0", "ffn.1"], ["emb", "ffn.0", "ffn.1"], ["attn", "emb", "ffn.0", "ffn.1"]]
    assert type(m["odd"]) is torch.nn.Linear  # block 8 does not divide 10 inputs: skipped
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith("centroids"))
    assert m["emb"].centroids.dtype == torch.float16  # rounded back after finetuning


def test_seeded_and_independent_of_finetune():
    a = lowbit.ipq.quantize(model(), config(), verbose=False)
    b = lowbit.ipq.quantize(model(), config(), verbose=False)
    for name in ("ffn.0", "emb", "attn"):
        x, y = a.get_submodule(name), b.get_submodule(name)
        assert torch.equal(x.centroids, y.centroids) and torch.equal(x.assignments, y.assignments)


def test_finetune_with_data_and_size_report():
    calls = []
    m = lowbit.ipq.quantize(model(), config(), finetune=lambda mod, d: calls.append(d), data="D",
                            verbose=False)
    assert calls == ["D", "D", "D"]
    rep = lowbit.ipq.size_report(m)
    f, s = rep.total("codebook")
    # ffn.0 (32x16): 16 fp16 centroids of 8 (256 B) + 32x2 (64 B); ffn.1 (16x32): 256 + 64;
    # emb (40x16): 16 of 4 (128 B) + 40x4 (160 B); attn (16x16): 8 of 8 (128 B) + 16x2 (32 B)
    assert (f, s) == (4 * (512 + 512 + 640 + 256), 320 + 320 + 288 + 160)
    assert "quantized layers" in str(rep)


def test_a_stage_matching_nothing_is_an_error():
    cfg = Config((LayerGroup("ffn", "re:ffn\\..*", (), 8, 16), LayerGroup("typo", "atn", (), 8, 8)))
    m = model()
    with pytest.raises(IPQConfigError, match=r"stage\(s\) \['typo'\] match no layer"):
        lowbit.ipq.quantize(m, cfg, verbose=False)
    assert type(m["ffn"][0]) is torch.nn.Linear  # nothing was quantized
