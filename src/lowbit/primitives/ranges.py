"""Range choice: which ``[lo, hi]`` each group is quantized over.

All functions take grouped floats ``(R, G, S)`` and return ``lo, hi`` of shape ``(R, G)``.

- ``minmax``: the extremes; nothing is clipped.
- ``percentile``: the p-th and (100-p)-th percentiles; clips outliers.
- ``mse``: grid search over shrink factors of the min-max range, keeping the factor with the least
  squared round-trip error per group (as in the MSE observers of common PTQ toolkits).
- ``greedy``: the greedy search of Guan et al., "Post-Training 4-bit Quantization on Embedding
  Tables" (arXiv 1911.02079): start at min-max, split the range into ``bins`` steps and move the
  end (lower or upper) whose move lowers the error more, until the range has shrunk by ``ratio``;
  keep the best range seen. The paper's defaults: 200 bins, ratio 0.16.
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .affine import fake_quantize_groups, params_from_range

MSE_GRID_POINTS = 100
MSE_MAX_SHRINK = 0.8
GREEDY_BINS = 200
GREEDY_RATIO = 0.16


def choose_range(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(lo, hi)`` by the spec's ``range_method``."""
    xg = xg.float()
    if spec.range_method == "minmax":
        return minmax(xg)
    if spec.range_method == "percentile":
        return percentile(xg, spec.percentile)
    if spec.range_method == "mse":
        return mse_search(xg, spec)
    return greedy_search(xg, spec)


def minmax(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xg.amin(dim=-1), xg.amax(dim=-1)


def percentile(xg: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rank percentiles (torch.kthvalue: no size limit, unlike torch.quantile)."""
    n = xg.shape[-1]
    k_hi = min(n, max(1, int(round(p / 100.0 * n))))
    k_lo = max(1, n + 1 - k_hi)
    return xg.kthvalue(k_lo, dim=-1).values, xg.kthvalue(k_hi, dim=-1).values


def _group_error(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zp = params_from_range(lo, hi, spec)
    err = fake_quantize_groups(xg, scale, zp, spec) - xg
    return err.square().sum(dim=-1)  # (R, G)


def mse_search(xg: torch.Tensor, spec: QuantSpec, points: int = MSE_GRID_POINTS,
               max_shrink: float = MSE_MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    lo0, hi0 = minmax(xg)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = _group_error(xg, lo0, hi0, spec)
    for i in range(1, points):
        f = 1.0 - max_shrink * i / points
        lo, hi = lo0 * f, hi0 * f
        err = _group_error(xg, lo, hi, spec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def greedy_search(xg: torch.Tensor, spec: QuantSpec, bins: int = GREEDY_BINS,
                  ratio: float = GREEDY_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised over groups: every group takes the same number of steps, each its own size."""
    lo, hi = minmax(xg)
    step = (hi - lo) / bins
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = _group_error(xg, lo, hi, spec)
    for _ in range(int(round(bins * ratio))):
        if spec.symmetric:  # a symmetric range has one end: shrink both together
            err_l = err_r = _group_error(xg, lo + step, hi - step, spec)
        else:
            err_l = _group_error(xg, lo + step, hi, spec)
            err_r = _group_error(xg, lo, hi - step, spec)
        move_lo = err_l < err_r
        lo = torch.where(move_lo | spec.symmetric, lo + step, lo)
        hi = torch.where(~move_lo | spec.symmetric, hi - step, hi)
        err = torch.minimum(err_l, err_r)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi
