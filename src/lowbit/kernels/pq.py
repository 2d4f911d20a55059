"""Forward passes of a product-quantized Linear (`primitives.codebook.CodebookWeight`), and their
plain-torch reference twin.

Forms (y = x @ W^T + b, W (out, in) made of n_blocks = in / block_size sub-vectors per row):
  ``cached``  reconstruct the float weight once and keep it: fp32's speed, but it holds out*in*4
              bytes at run time (all the size a codebook saves is given back in memory).
  ``gather``  W = centroids[assignments] rebuilt on every call, fp32 matmul (fairseq's form);
              differentiable in the centroids (the form for finetuning them). Slower than fp32:
              allocating and filling a fresh out*in weight costs more than the matmul.
  ``tiled``   the gather form by tiles of output rows (``TILE_BYTES``) into one buffer allocated per
              call (index_select into a preallocated tile is ~9x faster here than into a fresh
              weight: page faults dominate), one fp32 matmul per tile. Memory: one tile.
              Inference only (no autograd through ``out=``).
  ``lut``     lookup table (asymmetric distance computation, Jegou et al., "Product Quantization
              for Nearest Neighbor Search", TPAMI 2011): per input block the dot products with
              every centroid, ``T = x_block @ centroids^T`` (M, n_blocks, k), then
              ``y[m, o] = sum_j T[m, j, a[o, j]]``: one gather of n_blocks table entries and a sum
              per output, reading one int32 index per block instead of block_size floats. Pays at
              M = 1 on large weights only (its gather traffic grows with M; a GEMM's does not).
  ``ref``     the reference: `CodebookWeight.dequantize` then `F.linear`.
Each form is parity-tested against ``ref`` (tests/parity/test_pq.py). Timings and the measured
choice (`choose_form`): benchmarks/pq_forward.py, figures in its docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives.codebook import CodebookWeight

FORMS = ("cached", "gather", "tiled", "lut", "ref")
# bytes of one tile of the tiled form's weight buffer: 512 rows of a 4096-input weight (tiles of
# 32..512 rows measured on 4096x4096 at M = 64: 1.11, 1.17, 1.03, 0.97, 0.91 of fp32's time)
TILE_BYTES = 8 << 20


def reconstruct(cw: CodebookWeight) -> torch.Tensor:
    """The float32 weight as a 2-D (out, in) tensor (the ``cached`` form's state)."""
    return cw.dequantize(torch.float32).reshape(cw.rows, cw.cols)


def gather_index(cw: CodebookWeight) -> torch.Tensor:
    """int64 (out, n_blocks) centroid indices (the ``gather`` form's state)."""
    return cw.indices()


def flat_assign(cw: CodebookWeight) -> torch.Tensor:
    """int32 (out * n_blocks,) centroid indices, row-major (the ``tiled`` form's state)."""
    return cw.indices().to(torch.int32).reshape(-1)


def lut_index(cw: CodebookWeight) -> torch.Tensor:
    """int32 (out * n_blocks,) flat indices ``j * k + a[o, j]`` into a row of the
    (n_blocks * k) table (the ``lut`` form's state: 4 bytes per block)."""
    offsets = torch.arange(cw.n_blocks, dtype=torch.int64) * cw.k  # (n_blocks,)
    return (cw.indices() + offsets).to(torch.int32).reshape(-1)


def cached_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x2d.float(), weight, bias)


def gather_linear(x2d: torch.Tensor, centroids: torch.Tensor, index: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``centroids`` float32 (k, block_size), ``index`` int32/int64 (out, n_blocks); differentiable in
    ``centroids`` (and ``bias``)."""
    w = F.embedding(index, centroids).reshape(index.shape[0], -1)  # (out, n_blocks * block_size)
    return F.linear(x2d.float(), w, bias)


def tiled_linear(x2d: torch.Tensor, centroids: torch.Tensor, flat_assign: torch.Tensor,
                 out_features: int, bias: torch.Tensor | None,
                 tile_rows: int = 0) -> torch.Tensor:
    """``flat_assign`` int32 (out * n_blocks,) centroid indices, row-major; inference only."""
    x = x2d.float()
    m, inp = x.shape
    bs = centroids.shape[1]
    nb = inp // bs
    tile = min(tile_rows or max(1, TILE_BYTES // (4 * inp)), out_features)
    buf = torch.empty(tile * nb, bs)  # (tile * n_blocks, block_size)
    y = torch.empty(m, out_features)
    for r0 in range(0, out_features, tile):
        n = min(tile, out_features - r0)
        part = buf[:n * nb]
        torch.index_select(centroids, 0, flat_assign[r0 * nb:(r0 + n) * nb], out=part)
        torch.mm(x, part.view(n, inp).t(), out=y[:, r0:r0 + n])  # (M, n)
    return y if bias is None else y.add_(bias)


def lut_linear(x2d: torch.Tensor, centroids: torch.Tensor, flat_index: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``centroids`` float32 (k, block_size), ``flat_index`` int32 (out * n_blocks,) from
    `lut_index`."""
    m = x2d.shape[0]
    bs = centroids.shape[1]
    table = (x2d.float().reshape(-1, bs) @ centroids.t()).reshape(m, -1)  # (M, n_blocks * k)
    picked = torch.index_select(table, 1, flat_index)  # (M, out * n_blocks)
    y = picked.view(m, -1, table.shape[1] // centroids.shape[0]).sum(-1)  # (M, out)
    return y if bias is None else y + bias


def ref_linear(x2d: torch.Tensor, cw: CodebookWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference twin: dequantize by `primitives.codebook`, fp32 matmul."""
    return F.linear(x2d.float(), cw.dequantize(torch.float32).reshape(cw.rows, cw.cols), bias)


# Form choice without a cached weight, from benchmarks/pq_forward.py (1 thread, AMD EPYC, two runs
# on a machine loaded by other jobs, load average ~6 on 2 cores; median time / fp32 nn.Linear's):
#   M = 1:  lut 0.75-0.92 on 4096x4096, 0.40-1.12 on 1536x384, 1.63-1.67 on 384x384; gather/tiled
#           rebuild the weight and lose (1.0-3.3 on small weights, 1.5-10.7 on 4096x4096)
#   M = 8:  tiled 1.11-1.39 on 4096x4096; gather 1.05-1.89 on the 384-wide weights
#   M = 64: tiled 1.05-1.13 on 4096x4096; gather 0.98-1.06 on the 384-wide weights
# Only ``cached`` (0.8-1.0) is never slower than fp32, at the cost of fp32's memory.
TILED_MIN_NUMEL = 1 << 22


def choose_form(rows: int, numel: int, cached: bool = False, grad: bool = False) -> str:
    """The forward form for ``rows`` activation rows on a weight of ``numel`` elements:
    ``cached`` when a reconstructed weight is kept, ``gather`` when gradients must reach the
    centroids, else ``lut`` for one row, ``tiled`` for large weights, ``gather`` otherwise."""
    if cached:
        return "cached"
    if grad:
        return "gather"
    if rows == 1:
        return "lut"
    return "tiled" if numel >= TILED_MIN_NUMEL else "gather"
