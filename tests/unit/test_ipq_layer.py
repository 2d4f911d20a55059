"""iPQ per-layer pieces: stage matching, reasons to skip, seeded per-layer codebooks."""
from __future__ import annotations

import torch

from lowbit.algorithms.ipq import group_of, quantize_layer, unsupported_reason
from lowbit.ipq_config import IPQConfig, LayerGroup


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(50, 16),
                                "ffn": torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)),
                                "conv": torch.nn.Conv2d(3, 4, 3), "norm": torch.nn.LayerNorm(16)})


def config() -> IPQConfig:
    return IPQConfig((LayerGroup("ffn", "re:ffn\\..*", ("ffn.1",), 8, 16),
                      LayerGroup("rest", ("Linear", "Embedding", "Conv2d", "LayerNorm"), (), 4, 8)),
                     seed=5, n_iter=3)


def test_first_matching_stage_claims_a_layer():
    m, c = model(), config()
    stages = {n: group_of(c, n, mod) for n, mod in m.named_modules() if n}
    assert stages == {"emb": 1, "ffn": None, "ffn.0": 0, "ffn.1": 1, "conv": 1, "norm": 1}


def test_unsupported_reasons_name_the_problem():
    m, c = model(), config()
    assert unsupported_reason(m["norm"], c.groups[1]).startswith("unsupported module type LayerNorm")
    assert unsupported_reason(m["conv"], c.groups[1]) == "block_size 4 does not divide in_channels*kh*kw = 27"
    assert unsupported_reason(m["ffn"][0], c.groups[0]) is None


def test_quantize_layer_is_seeded_by_config_and_place():
    w = model()["ffn"][0].weight
    c = config()
    a, b = quantize_layer(w, c, 0, 0), quantize_layer(w, c, 0, 0)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    other = quantize_layer(w, c, 0, 1)
    assert not torch.equal(a.centroids, other.centroids)
    assert a.k == 16 and a.block_size == 8 and a.centroids.dtype == torch.float16
