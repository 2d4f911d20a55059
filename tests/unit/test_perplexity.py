"""Sliding-window perplexity (src/lowbit/eval/perplexity.py) on a tiny random LlamaForCausalLM."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.perplexity import perplexity, windows

transformers = pytest.importorskip("transformers")

VOCAB, T = 97, 20
REL_TOL = 1e-6  # float32 logits, float64 sums


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(1))


def direct_nll(lm, ids: torch.Tensor, begin: int, end: int, first: int) -> float:
    """Sum of -log p(token) for tokens first..end-1, from one forward over ids[begin:end]."""
    with torch.no_grad():
        logits = lm(ids[begin:end][None]).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -sum(float(logp[p - begin - 1, ids[p]]) for p in range(first, end))


def test_one_window_equals_the_full_sequence_loss(lm, ids):
    r = perplexity(lm, ids, context=64, stride=32)
    with torch.no_grad():
        logits = lm(ids[None]).logits[0]
    want = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    assert (r.windows, r.tokens) == (1, T - 1)
    assert r.perplexity == pytest.approx(want, rel=REL_TOL)


def test_sliding_windows_equal_a_hand_listed_computation(lm, ids):
    """context 8, stride 4 on 20 tokens: the windows of the module docstring's diagram."""
    hand = [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]
    assert windows(T, 8, 4) == hand
    r = perplexity(lm, ids[None], context=8, stride=4)
    nll = sum(direct_nll(lm, ids, *w) for w in hand)
    assert (r.windows, r.tokens, r.context, r.stride) == (4, T - 1, 8, 4)
    assert r.nll_sum == pytest.approx(nll, rel=REL_TOL)
    assert r.perplexity == pytest.approx(math.exp(nll / (T - 1)), rel=REL_TOL)
    # truncated context changes the answer: the windows really are shorter than the sequence
    assert abs(r.perplexity - perplexity(lm, ids, 64, 64).perplexity) > 1e-4


def test_windows_cover_every_token_once():
    for length, context, stride in [(20, 8, 4), (21, 8, 3), (100, 16, 16), (5, 8, 2), (9, 8, 1)]:
        scored = [p for _, end, first in windows(length, context, stride) for p in range(first, end)]
        if stride < context:
            assert scored == list(range(1, length)), (length, context, stride)
        for begin, end, first in windows(length, context, stride):
            assert end - begin <= context and begin < first <= end


def test_stride_equal_to_context_leaves_each_window_start_unscored():
    assert windows(16, 8, 8) == [(0, 8, 1), (8, 16, 9)]


class Uniform(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, VOCAB)


def test_uniform_model_has_perplexity_vocab_size(ids):
    # float32 cross entropy: log(97) to ~1e-7 relative
    assert perplexity(Uniform(), ids, context=8, stride=3).perplexity == pytest.approx(VOCAB, rel=REL_TOL)


@pytest.mark.parametrize("length,context,stride,match", [
    (20, 1, 1, "context must be at least 2"),
    (20, 8, 9, r"stride must be in 1..context \(8\), found 9"),
    (20, 8, 0, "stride must be in"),
    (1, 8, 4, "at least 2 tokens"),
])
def test_bad_arguments_are_named(length, context, stride, match):
    with pytest.raises(ValueError, match=match):
        perplexity(Uniform(), torch.zeros(length, dtype=torch.long), context, stride)
