"""GPTQ: quantize one column at a time and spread each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar, Ashkboos, Hoefler,
Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv 2210.17323, Algorithm 1: lazy batch updates over blocks of columns, the Cholesky form of the
inverse Hessian, dampening, and the "act order" heuristic of its reference code).

The layer's loss is ``||X W^T - X Q^T||^2`` over calibration inputs ``X (n, in)``; its Hessian is
proportional to ``H = X^T X / n`` (in, in). Any positive multiple works: the damping is relative
(``damp * mean(diag(H))``).

Groups and act order. lowbit's layout puts group ``g`` on the ORIGINAL columns
``[g * group_size, (g + 1) * group_size)`` and stores the codes in the original order. With
``act_order`` the columns are processed by decreasing ``H_ii`` (the permutation is undone before
packing), so a group's columns are reached scattered through the run. A group's scale and zero
point are chosen when the run first reaches one of its columns, from the current values of all
its columns (none is quantized yet; each already carries the error feedback of the columns
quantized before it, up to the start of the current block of ``block_size`` columns, and within
the block for columns inside it). They are then fixed for the group's remaining columns. Without
act order this is the reference's choice (params at the group's first column from
``W[:, i:i + group_size]``); with it, it keeps original-order groups like the reference's
"static groups" option, but with ranges of the error-corrected weights instead of the original
ones. The ranges come from `primitives.ranges.choose_range` (the spec's range method: min-max,
MSE, ...); every rounding goes through `primitives.affine`.

Dead inputs (``H_ii == 0``: the input was always zero during calibration) get ``H_ii = 1``: their
row and column of ``H`` are zero, so they neither send nor receive error feedback and are rounded
to nearest. (The reference code also zeroes their weights; lowbit keeps them, so the layer stays
as it was for inputs the calibration never showed.)
"""
from __future__ import annotations

import warnings

import torch

from ..primitives import QuantizedWeight, pack
from ..primitives.affine import (QuantizationError, as_2d, check_groupable, dequantize_codes,
                                 params_from_range, quantize_codes)
from ..primitives.ranges import choose_range
from ..spec import QuantSpec

# Default damping, relative to mean(diag H). The paper's code uses 0.01 with 128 x 2,048-token
# calibration sets; with lowbit's few thousand to 32k tokens for 384-1,536-wide inputs H is noisy
# and 0.1 measured better at every bit width on both benchmark models (MiniLM w4g128 0.9807 vs
# 0.9795, w3g128 0.9383 vs 0.9307, w2g64 0.7845 vs 0.7636; SmolLM2 w4g64 perplexity 54.54 vs
# 54.90; BENCHMARKS.md), so one default serves every bit width.
DEFAULT_DAMP = 0.1
DAMP_RETRIES = 4  # on a failed Cholesky the damping is raised x10, this many times at most
DAMP_GROWTH = 10.0


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = DEFAULT_DAMP,
         act_order: bool = True, block_size: int = 128, name: str = "weight") -> QuantizedWeight:
    """Quantize ``weight`` (out, in...) under ``spec`` with GPTQ, given ``hessian`` (in, in).

    Returns lowbit's standard `QuantizedWeight` (codes in the original column order).
    """
    w = _checked_weight(weight, hessian, spec, name)  # (rows, cols) float32 copy
    rows, cols = w.shape
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(cols)
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp, name)  # (cols, cols) upper Cholesky factor of H^-1
    grid = _Grid(spec, rows, cols, perm)
    codes = _run(w[:, perm], hinv, grid, block_size)  # (rows, cols), permuted order
    codes = codes[:, torch.argsort(perm)]  # (rows, cols), original order
    return QuantizedWeight(pack(codes, spec.bits), grid.scale, grid.zero_point, spec,
                           tuple(weight.shape))


def _checked_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                    name: str) -> torch.Tensor:
    if not torch.is_floating_point(weight):
        raise QuantizationError(f"{name}: expected a floating-point weight, found {weight.dtype}")
    w = as_2d(weight.detach().to(torch.float32)).clone()  # (rows, cols)
    check_groupable(tuple(w.shape), spec, name)
    cols = w.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise QuantizationError(f"{name}: the Hessian must be ({cols}, {cols}) for a weight with "
                                f"{cols} input columns, found {tuple(hessian.shape)}")
    for what, t in (("weight", w), ("Hessian", hessian)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise QuantizationError(f"{name}: the {what} has {bad} NaN/Inf values; refusing to quantize")
    return w


def _inverse_hessian_factor(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, ``lambda = damp * mean(diag H)``; on failure
    the damping is raised x10 (with a warning naming the layer) up to `DAMP_RETRIES` times."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(DAMP_RETRIES + 1):
        factor = _try_factor(h + (damp * mean_diag) * eye)
        if factor is not None:
            return factor
        if attempt < DAMP_RETRIES:
            warnings.warn(f"{name}: GPTQ's Hessian is not positive definite with damp={damp:g}; "
                          f"retrying with damp={damp * DAMP_GROWTH:g}", RuntimeWarning, stacklevel=3)
            damp *= DAMP_GROWTH
    raise QuantizationError(f"{name}: GPTQ's Hessian stays not positive definite up to damp={damp:g}; "
                            "check the calibration inputs (too few samples, or NaN/Inf activations)")


def _try_factor(h: torch.Tensor) -> torch.Tensor | None:
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    inv = torch.cholesky_inverse(low)
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper


class _Grid:
    """Per-group scale and zero point, chosen on first touch (see the module docstring)."""

    def __init__(self, spec: QuantSpec, rows: int, cols: int, perm: torch.Tensor) -> None:
        self.spec = spec
        if spec.granularity == "group":
            gsize, n_groups, prow = spec.group_size, cols // spec.group_size, rows
        else:  # channel / row: one group per row; tensor: one group for all
            gsize, n_groups, prow = cols, 1, (1 if spec.granularity == "tensor" else rows)
        self.group_of = perm // gsize  # (cols,) group of each permuted column
        self.pos_of = torch.argsort(perm)  # original column -> permuted position
        self.gsize = gsize
        self.scale: torch.Tensor | None = None
        self.zero_point: torch.Tensor | None = None
        self.ready = torch.zeros(n_groups, dtype=torch.bool)
        self._shape = (prow, n_groups)

    def ensure(self, g: int, w: torch.Tensor, w1: torch.Tensor, i1: int) -> None:
        """Choose group ``g``'s params from the current values (``w1`` holds columns i1..)."""
        if bool(self.ready[g]):
            return
        pos = self.pos_of[g * self.gsize:(g + 1) * self.gsize]  # permuted positions of the group
        vals = w[:, pos]  # (rows, gsize), as of the block start
        inside = (pos >= i1) & (pos < i1 + w1.shape[1])
        vals[:, inside] = w1[:, pos[inside] - i1]  # the current block's columns, up to date
        xg = vals.reshape(1, 1, -1) if self.spec.granularity == "tensor" else vals.unsqueeze(1)
        scale, zp = params_from_range(*choose_range(xg, self.spec), self.spec)  # (R, 1) each
        if self.scale is None:
            self.scale = torch.zeros(self._shape, dtype=scale.dtype)
            self.zero_point = None if zp is None else torch.zeros(self._shape, dtype=zp.dtype)
        self.scale[:, g] = scale[:, 0]
        if zp is not None:
            self.zero_point[:, g] = zp[:, 0]
        self.ready[g] = True

    def round(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One column (rows,) -> its codes (rows,) uint8 and their dequantized values (rows,)."""
        scale = self.scale[:, g:g + 1]  # (R, 1)
        zp = None if self.zero_point is None else self.zero_point[:, g:g + 1]
        q = quantize_codes(col.reshape(-1, 1, 1), scale, zp, self.spec)  # (rows, 1, 1)
        return q.reshape(-1), dequantize_codes(q, scale, zp, self.spec).reshape(-1)


def _run(w: torch.Tensor, hinv: torch.Tensor, grid: _Grid, block_size: int) -> torch.Tensor:
    """Algorithm 1 of the paper on permuted columns: (rows, cols) float -> (rows, cols) codes."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # (rows, b) the block, updated column by column
        err = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(grid.group_of[i1 + i])
            grid.ensure(g, w, w1, i1)
            codes[:, i1 + i], dq = grid.round(w1[:, i], g)
            e = (w1[:, i] - dq) / h1[i, i]
            w1[:, i:].sub_(e.unsqueeze(1) * h1[i, i:].unsqueeze(0))  # (rows, b - i)
            err[:, i] = e
        w[:, i2:].sub_(err @ hinv[i1:i2, i2:])  # lazy batch update of the later columns
    return codes
