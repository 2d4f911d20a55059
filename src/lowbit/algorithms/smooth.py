"""SmoothQuant's per-channel smoothing (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023, arXiv 2211.10438), as functions on tensors.

A Linear consumer computes ``y = X W^T``. For any positive per-input-channel vector ``s`` (C,),
``X W^T = (X diag(1/s)) (W diag(s))^T``: dividing activation channel ``j`` by ``s_j`` moves its
outliers into weight column ``j``. The division is folded into the producer of ``X`` (a norm's
per-channel weight and bias, or a preceding Linear's output rows and bias), so nothing runs at
inference time. With the migration strength ``alpha`` in [0, 1] (paper eq. 4)::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

where ``max|W_j|`` is taken over column ``j`` of every Linear that consumes the same ``X`` (they
all get multiplied by the same ``s``). Channels where either maximum is zero keep ``s_j = 1``;
``s`` is clamped to [`MIN_FACTOR`, 1 / `MIN_FACTOR`]. Folds are computed in float64 and cast back
to the tensors' dtype, so a float32 model's function changes by float32 rounding only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LowbitError

MIN_FACTOR = 1e-5  # smoothing factors are clamped to [MIN_FACTOR, 1 / MIN_FACTOR]


class SmoothError(LowbitError):
    """Bad smoothing input (alpha, shapes, factors); the message names it."""


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise SmoothError(f"smooth alpha must be a number in [0, 1] (0.5 in the paper), found {alpha!r}")
    return float(alpha)


def consumer_absmax(weights: Sequence[torch.Tensor], name: str = "consumers") -> torch.Tensor:
    """max |W[:, j]| over the columns of every consumer weight (N_i, C) -> (C,) float64."""
    if not weights:
        raise SmoothError(f"{name}: no consumer weights given")
    cols = {w.shape[-1] for w in weights}
    if len(cols) != 1 or any(w.dim() != 2 for w in weights):
        raise SmoothError(f"{name}: consumer weights must be 2-D with the same number of input "
                          f"columns, found shapes {[tuple(w.shape) for w in weights]}")
    return torch.stack([w.detach().double().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                      name: str = "layer") -> torch.Tensor:
    """``s = act_absmax ** alpha / weight_absmax ** (1 - alpha)`` per channel (C,) float64; 1 where
    either maximum is 0, clamped to [MIN_FACTOR, 1 / MIN_FACTOR]."""
    alpha = check_alpha(alpha)
    a, w = act_absmax.double().reshape(-1), weight_absmax.double().reshape(-1)
    if a.shape != w.shape:
        raise SmoothError(f"{name}: {a.numel()} activation channels but {w.numel()} weight columns")
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()) or (a < 0).any() or (w < 0).any():
        raise SmoothError(f"{name}: channel maxima must be finite and >= 0")
    live = (a > 0) & (w > 0)
    s = a.clamp(min=MIN_FACTOR).pow(alpha) / w.clamp(min=MIN_FACTOR).pow(1.0 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(MIN_FACTOR, 1.0 / MIN_FACTOR)


def check_factors(s: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """``s`` as float64 (channels,), or `SmoothError` if its size is wrong or a factor is not
    finite and > 0."""
    s = s.double().reshape(-1)
    if s.numel() != channels:
        raise SmoothError(f"{what}: {channels} channels but {s.numel()} smoothing factors")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise SmoothError(f"{what}: smoothing factors must be finite and > 0")
    return s


def fold_producer(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                  name: str = "producer") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide output channel ``j`` by ``s_j``: a norm's weight (C,) or a Linear's rows (C, K), and
    the bias (C,). Returns new tensors in the inputs' dtypes."""
    s = check_factors(s, weight.shape[0], name)
    per_row = s.reshape(-1, *([1] * (weight.dim() - 1)))  # (C,) or (C, 1)
    new_w = (weight.detach().double() / per_row).to(weight.dtype)
    new_b = None if bias is None else (bias.detach().double() / s).to(bias.dtype)
    return new_w, new_b


def fold_consumer(weight: torch.Tensor, s: torch.Tensor, name: str = "consumer") -> torch.Tensor:
    """Multiply input column ``j`` of a Linear weight (N, C) by ``s_j``; a new tensor, same dtype."""
    if weight.dim() != 2:
        raise SmoothError(f"{name}: a consumer weight must be 2-D (out, in), found {tuple(weight.shape)}")
    s = check_factors(s, weight.shape[1], name)
    return (weight.detach().double() * s.reshape(1, -1)).to(weight.dtype)  # (N, C) * (1, C)
