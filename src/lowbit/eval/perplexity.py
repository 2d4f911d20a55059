"""Perplexity of a causal language model on one token sequence, by sliding windows.

The method of the Hugging Face guide "Perplexity of fixed-length models": windows of at most
``context`` tokens start every ``stride`` tokens; each window scores only the tokens that the
previous window did not, so every scored token sees at least ``context - stride`` tokens of left
context (all of them, up to ``context``, while the windows are still growing from the start)::

    tokens   0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19      context 8, stride 4
    window 1 [ . s s s s s s s ]                                     scores 1..7
    window 2         [ . . . . s  s  s  s ]                          scores 8..11
    window 3                 [ .  .  .  .  s  s  s  s ]              scores 12..15
    window 4                          [ .  .  .  .  s  s  s  s ]     scores 16..19

A token is scored from the logits at the position before it in its window, so the sequence's
first token is never scored and a window never scores its own first token (with
``stride == context`` the first token of every window goes unscored: use ``stride < context``).
``perplexity = exp(sum of scored negative log-likelihoods / scored tokens)``, summed in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_sum: float      # natural log, summed over the scored tokens
    tokens: int         # tokens scored
    windows: int
    context: int
    stride: int


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: the model sees tokens ``[begin, end)`` and the
    tokens ``[first_scored, end)`` are scored."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, found {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), found {stride}")
    if length < 2:
        raise ValueError(f"the sequence needs at least 2 tokens to score one, found {length}")
    out, prev_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == length:
            break
    return out


def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, context: int, stride: int) -> Perplexity:
    """Perplexity of ``model`` (called as ``model(input_ids=(1, T))``, returning ``.logits`` or a
    tensor (1, T, vocab)) on ``input_ids`` (T,) or (1, T)."""
    ids = input_ids.reshape(-1).long()  # (T,)
    spans = windows(ids.numel(), context, stride)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin, end, first in spans:
            out = model(input_ids=ids[begin:end].unsqueeze(0))
            logits = getattr(out, "logits", out)[0].float()  # (end - begin, vocab)
            pred = logits[first - begin - 1:end - begin - 1]  # predicts tokens first..end-1
            nll += F.cross_entropy(pred, ids[first:end], reduction="sum").double().item()
            count += end - first
    return Perplexity(math.exp(nll / count), nll, count, len(spans), context, stride)
