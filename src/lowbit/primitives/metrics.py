"""Quality metrics: SQNR in dB and cosine similarity."""
from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when the two are equal."""
    ref, approx = ref.detach().double(), approx.detach().double()
    return db_from_sums(ref.square().sum().item(), (ref - approx).square().sum().item())


def db_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise) from the two sums of squares; +inf when noise is 0."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows, (n, d) x (n, d) -> (n,)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
