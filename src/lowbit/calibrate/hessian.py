"""The layer-input Hessian of GPTQ: ``H = X^T X / n`` over every token a layer sees.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) quantizes a Linear's weight to minimise ``||W X - W_hat X||^2``,
whose Hessian in ``W``'s rows is ``2 X^T X`` (X: the layer inputs, one row per token). This class
returns the mean ``X^T X / n``: the factor 2 and the damping are the algorithm's to choose.

Precision and cost: each chunk of at most `CHUNK_ROWS` rows is multiplied in float32 (float64
inputs stay float64) and the chunk's product is added into a float64 sum, so millions of tokens
add up without float32's loss while the GEMM, which dominates calibration, runs at float32 speed
(a float64 GEMM took 4x the time at 576 features on an AMD EPYC; a chunk's float32 sum of 4,096
products has a relative error near 1e-6, far below any damping GPTQ uses). `gram` exposes one
input's product so that layers fed the same tensor (a transformer's q/k/v projections) share it.
"""
from __future__ import annotations

import torch
from ..errors import LowbitError

CHUNK_ROWS = 4096  # rows per float32 product; chunks are summed in float64


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
        if isinstance(x, torch.Tensor) and x.dim() and self.in_features not in (None, x.shape[-1]):
            raise HessianError(f"HessianAccumulator expects {self.in_features} input features, "
                               f"found shape {tuple(x.shape)}")
        self.add_gram(*gram(x))

    def add_gram(self, product: torch.Tensor, rows: int) -> None:
        """Add a `gram` result: ``(in, in)`` ``X^T X`` of ``rows`` input rows (summed in float64)."""
        d = product.shape[-1]
        if self.in_features is None:
            self.in_features = d
        if d != self.in_features:
            raise HessianError(f"HessianAccumulator expects {self.in_features} input features, "
                               f"found {d}")
        if self._sum is None:
            with torch.inference_mode(False):  # a normal tensor: `take` finishes it in place later
                self._sum = torch.zeros(d, d, dtype=torch.float64)
        self._sum.add_(product)
        self.samples += rows

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` (float64, exactly symmetric, a fresh tensor each call)."""
        if self.samples == 0:
            raise HessianError("HessianAccumulator has seen no rows; call update(x) first")
        return (self._sum + self._sum.T) / (2 * self.samples)

    def take(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`hessian` in ``dtype``, computed in the running sum's own memory (one transposed copy
        lives only during the call); the accumulator is empty afterwards. `calibrate.collect`
        finishes every layer this way, one at a time, in float32 (what GPTQ computes in), so
        SmolLM2's 210 Hessians end as 0.4 GiB after 0.8 GiB of float64 sums, never both."""
        if self.samples == 0:
            raise HessianError("HessianAccumulator has seen no rows; call update(x) first")
        total, self._sum = self._sum, None
        total.add_(total.T.clone()).div_(2 * self.samples)
        self.samples = 0
        return total.to(dtype)

    def copy(self) -> "HessianAccumulator":
        """An independent accumulator holding the same sum and row count."""
        twin = HessianAccumulator(self.in_features)
        twin.samples = self.samples
        with torch.inference_mode(False):
            twin._sum = None if self._sum is None else self._sum.clone()
        return twin


def gram(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(X^T X, rows)`` of inputs ``x (..., in)``: ``(in, in)``, the product of one chunk
    (float32, or float64 for float64 inputs) or, above `CHUNK_ROWS` rows, the float64 sum of the
    chunks' products. Not symmetrized here (a pass over ``in^2`` values per call costs as much as
    a 576-wide product): `HessianAccumulator.hessian` symmetrizes the sum once."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise HessianError(f"HessianAccumulator takes a floating tensor (..., in_features), found "
                           f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.detach().reshape(-1, d).to(dtype)  # (tokens, in)
    if not torch.isfinite(rows).all():
        raise HessianError("HessianAccumulator: the input holds NaN or inf")
    if rows.shape[0] <= CHUNK_ROWS:
        return rows.T @ rows, rows.shape[0]
    total = torch.zeros(d, d, dtype=torch.float64)
    for r0 in range(0, rows.shape[0], CHUNK_ROWS):
        chunk = rows[r0:r0 + CHUNK_ROWS]  # (<= CHUNK_ROWS, in)
        total.add_(chunk.T @ chunk)
    return total, rows.shape[0]
