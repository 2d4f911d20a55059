"""The layer-input Hessian of GPTQ: ``H = X^T X / n`` over every token a layer sees.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) quantizes a Linear's weight to minimise ``||W X - W_hat X||^2``,
whose Hessian in ``W``'s rows is ``2 X^T X`` (X: the layer inputs, one row per token). This class
returns the mean ``X^T X / n``: the factor 2 and the damping are the algorithm's to choose.
Sums are float64 whatever the input dtype, so millions of tokens add up without float32's loss.
"""
from __future__ import annotations

import torch
from ..errors import LowbitError


class HessianError(LowbitError):
    """A bad input to, or an empty, `HessianAccumulator`."""


class HessianAccumulator:
    """``update(x)`` with inputs ``(..., in_features)``; ``hessian()`` -> ``(in, in)`` float64.

    >>> acc = HessianAccumulator()
    >>> acc.update(torch.ones(4, 3)); acc.hessian()[0, 0].item(), acc.samples
    (1.0, 4)
    """

    def __init__(self, in_features: int | None = None) -> None:
        if in_features is not None and (not isinstance(in_features, int) or in_features < 1):
            raise HessianError(f"in_features must be a positive integer, found {in_features!r}")
        self.in_features = in_features
        self.samples = 0  # rows (tokens) seen
        self._sum: torch.Tensor | None = None  # (in, in) float64: sum of x x^T over rows

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise HessianError(f"HessianAccumulator takes a floating tensor (..., in_features), found "
                               f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        d = x.shape[-1]
        if self.in_features is None:
            self.in_features = d
        if d != self.in_features:
            raise HessianError(f"HessianAccumulator expects {self.in_features} input features, "
                               f"found shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, d).double()  # (tokens, in)
        if not torch.isfinite(rows).all():
            raise HessianError("HessianAccumulator: the input holds NaN or inf")
        if self._sum is None:
            self._sum = torch.zeros(d, d, dtype=torch.float64)
        self._sum.addmm_(rows.T, rows)
        self.samples += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` (float64, a fresh tensor each call)."""
        if self.samples == 0:
            raise HessianError("HessianAccumulator has seen no rows; call update(x) first")
        return self._sum / self.samples
