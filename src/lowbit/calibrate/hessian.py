"""The layer-input Hessian of GPTQ: ``H = X^T X / n`` over every token a layer sees.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) quantizes a Linear's weight to minimise ``||W X - W_hat X||^2``,
whose Hessian in ``W``'s rows is ``2 X^T X`` (X: the layer inputs, one row per token). This class
returns the mean ``X^T X / n``: the factor 2 and the damping are the algorithm's to choose.

Precision and cost: each chunk of at most `CHUNK_ROWS` rows is multiplied in float32 (float64
inputs stay float64) and the chunk's product is added into a float64 sum, so millions of tokens
add up without float32's loss while the GEMM, which dominates calibration, runs at float32 speed
(a float64 GEMM took 4x the time at 576 features on an AMD EPYC; a chunk's float32 sum of 4,096
products has a relative error near 1e-6, far below any damping GPTQ uses). The sum keeps the
upper triangle only, in slabs of rows: float64 precision in float32's memory. `gram` exposes one input's product
so that layers fed the same tensor (a transformer's q/k/v projections) share it.
"""
from __future__ import annotations

import torch
from ..errors import LowbitError

CHUNK_ROWS = 4096  # rows per float32 product; chunks are summed in float64


class HessianError(LowbitError):
    """A bad input to, or an empty, `HessianAccumulator`."""


BAND = 128  # rows per slab of the running sum's upper triangle


class HessianAccumulator:
    """``update(x)`` with inputs ``(..., in_features)``; ``hessian()`` -> ``(in, in)`` float64.

    The running sum is the upper triangle of ``X^T X`` in float64, held as slabs of `BAND` rows
    (slab ``k``: rows ``[kB, kB + B)``, columns ``[kB, in)``): about ``in^2 / 2`` values, the
    memory of a full float32 matrix, with float64's sums. The lower triangle of each product is
    the upper one up to rounding and is not added; `hessian` and `take` mirror the upper one, so
    the result is exactly symmetric.

    >>> acc = HessianAccumulator()
    >>> acc.update(torch.ones(4, 3)); acc.hessian()[0, 0].item(), acc.samples
    (1.0, 4)
    """

    def __init__(self, in_features: int | None = None) -> None:
        if in_features is not None and (not isinstance(in_features, int) or in_features < 1):
            raise HessianError(f"in_features must be a positive integer, found {in_features!r}")
        self.in_features = in_features
        self.samples = 0  # rows (tokens) seen
        self._sum: list[torch.Tensor] | None = None  # float64 slabs of the upper triangle

    def update(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and x.dim() and self.in_features not in (None, x.shape[-1]):
            raise HessianError(f"HessianAccumulator expects {self.in_features} input features, "
                               f"found shape {tuple(x.shape)}")
        self.add_gram(*gram(x))

    def add_gram(self, product: torch.Tensor, rows: int) -> None:
        """Add a `gram` result: ``(in, in)`` ``X^T X`` of ``rows`` input rows (its upper triangle,
        summed in float64)."""
        d = product.shape[-1]
        if self.in_features is None:
            self.in_features = d
        if product.dim() != 2 or product.shape[0] != d or d != self.in_features:
            raise HessianError(f"HessianAccumulator expects {self.in_features} input features, "
                               f"found a product of shape {tuple(product.shape)}")
        if self._sum is None:
            with torch.inference_mode(False):  # normal tensors: `take` may reuse them later
                self._sum = [torch.zeros(min(BAND, d - r0), d - r0, dtype=torch.float64)
                             for r0 in range(0, d, BAND)]
        for slab, r0 in zip(self._sum, range(0, d, BAND)):
            slab.add_(product[r0:r0 + BAND, r0:])
        self.samples += rows

    def hessian(self) -> torch.Tensor:
        """``X^T X / n`` (float64, exactly symmetric, a fresh tensor each call)."""
        if self.samples == 0:
            raise HessianError("HessianAccumulator has seen no rows; call update(x) first")
        return _mirror(self._sum, self.samples, self.in_features, torch.float64, keep=True)

    def take(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`hessian` in ``dtype`` (divided in float64, rounded once), and the accumulator emptied
        slab by slab: `calibrate.collect` finishes its layers one at a time this way, in float32
        (what GPTQ computes in), so the sums and the results never all exist at once (SmolLM2's
        120 distinct Hessians: 0.4 GiB of sums, then 0.4 GiB of results)."""
        if self.samples == 0:
            raise HessianError("HessianAccumulator has seen no rows; call update(x) first")
        slabs, self._sum = self._sum, None
        h = _mirror(slabs, self.samples, self.in_features, dtype, keep=False)
        self.samples = 0
        return h

    def copy(self) -> "HessianAccumulator":
        """An independent accumulator holding the same sum and row count."""
        twin = HessianAccumulator(self.in_features)
        twin.samples = self.samples
        with torch.inference_mode(False):
            twin._sum = None if self._sum is None else [slab.clone() for slab in self._sum]
        return twin


def _mirror(slabs: list[torch.Tensor], n: int, d: int, dtype: torch.dtype,
            keep: bool) -> torch.Tensor:
    """The symmetric ``(d, d)`` matrix in ``dtype`` of the upper-triangle slabs divided by ``n``
    (in float64, then rounded once); ``keep=False`` empties ``slabs`` as it goes."""
    with torch.inference_mode(False):
        out = torch.empty(d, d, dtype=dtype)
        for r0 in range(0, d, BAND):
            part = (slabs[r0 // BAND] / n).to(dtype)  # (b, d - r0)
            if not keep:
                slabs[r0 // BAND] = None
            b = part.shape[0]
            square = part[:, :b]
            out[r0:r0 + b, r0:r0 + b] = torch.triu(square) + torch.triu(square, 1).T
            out[r0:r0 + b, r0 + b:] = part[:, b:]
            out[r0 + b:, r0:r0 + b] = part[:, b:].T
    return out


def gram(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(X^T X, rows)`` of inputs ``x (..., in)``: ``(in, in)``, the product of one chunk
    (float32, or float64 for float64 inputs) or, above `CHUNK_ROWS` rows, the float64 sum of the
    chunks' products. `HessianAccumulator` adds its upper triangle only."""
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
