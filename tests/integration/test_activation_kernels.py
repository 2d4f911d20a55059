"""all-MiniLM-L6-v2 with its Linear layers computed by the dynamic w8a8 kernel (patched into a copy
in this test only; wiring it into `QLinear` is the lead's): quality of sentence embeddings vs fp32.

Budgets: mean cosine >= 0.997 and min >= 0.98 are issue 6's figures (torch.ao's x86 dynamic path:
0.948 / 0.919 measured by benchmarks/activations.py; torch 2.13 CPU, AMD EPYC).
"""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import int8_dynamic as k8
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

pytestmark = pytest.mark.integration

W8A8_COS_MEAN, W8A8_COS_MIN = 0.997, 0.98  # issue 6; measured 0.99893 / 0.99836


def patch_linears(model: torch.nn.Module, make) -> torch.nn.Module:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            fn = make(mod)
            mod.forward = lambda x, fn=fn: fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return model


def w8a8(mod):
    qw = quantize_weight(mod.weight, parse_scheme("w8"))
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    return lambda x: k8.w8a8_linear(x, prepared, mod.bias)


def test_w8a8_minilm_quality(minilm, embed, fp32_embeddings):
    cos = (embed(patch_linears(minilm.copy(), w8a8)) * fp32_embeddings).sum(-1)
    assert cos.mean().item() >= W8A8_COS_MEAN and cos.min().item() >= W8A8_COS_MIN
