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
              every centroid, ``T = x_block @ centroids^T`` (one GEMM, laid out (n_blocks * k, M)),
              then ``y[m, o] = sum_j T[a[o, j] + j * k, m]``: one ``torch.embedding_bag`` (mode
              sum, one bag of n_blocks rows per output) reading one int32 index per block
              instead of block_size floats. Two ops; pays on large weights at M = 1..8.
  ``lutg``    the same table laid out (M, n_blocks, k), summed by one ``torch.gather`` along k
              with an int64 (n_blocks, out) index (8 bytes per block) and a sum over blocks:
              fewer, vectorized gathers than the bag form; pays at M = 1 (1.1-1.8x fp32 on
              384-wide weights where the bag form is 1.8-2.7x).
  ``bf16``    the tiled gather from bfloat16 centroids (a bf16 copy of the k*block_size
              centroid values: the size of the stored centroids) into a bf16 tile, bf16 GEMM,
              fp32 output (a CPU with AVX512_BF16 runs a bf16 GEMM in 0.4-0.5x of fp32's time).
              The decoded weight lives for one call (one tile on large weights), never longer.
  ``bf16-jit`` the ``bf16`` form with the compiled gather (`pq_jit.RowGather`: 8/16-byte unit copies,
              over numba's threads when torch runs several; a layer keeps its RowGather, so
              the numpy views are made once). Which gather wins depends on the host and the
              thread count (here, 1 thread: 0.44-0.81x of fp32 at 64 rows against ``bf16``'s
              0.62-1.00x; 2 threads: 0.39-1.06x against 0.48-1.19x), so both are offered to the
              selector.
  ``jit``     the lookup table built and summed in one compiled loop (`kernels.pq_jit`, numba):
              per block a k-float table, added into every output before the next block; one
              call a forward. Offered only where compiled kernels run (`pq_jit.available`).
  ``ref``     the reference: `CodebookWeight.dequantize` then `F.linear` (``ref_bf16_linear``:
              the same weight rounded to bf16, bf16 GEMM, the ``bf16`` form's twin).
Which of `SELECTABLE` serves a layer at M rows is measured on the host by `kernels.select`
(`nn.pq.PQLinear.candidates`; selector names ``pq-<form>``), never fixed here.
Each form is parity-tested against ``ref`` (tests/parity/test_pq.py). Timings side by side:
benchmarks/pq_forward.py, figures in BENCHMARKS.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pq_jit
from ..primitives.codebook import CodebookWeight

FORMS = ("cached", "gather", "tiled", "lut", "lutg", "bf16", "bf16-jit", "jit", "ref")
# forms the host-measured selector may pick (no float weight kept between calls), and the prefix
# of their selector names (``pq-lut``: no clash with `kernels.cpu`'s path names); ``jit`` only
# where compiled kernels run (`selectable`)
SELECTABLE = ("tiled", "gather", "lut", "lutg", "bf16", "bf16-jit", "jit")
SELECTOR_PREFIX = "pq-"
# bytes of one tile of the tiled form's weight buffer: 512 rows of a 4096-input weight (tiles of
# 32..512 rows measured on 4096x4096 at M = 64: 1.11, 1.17, 1.03, 0.97, 0.91 of fp32's time)
TILE_BYTES = 8 << 20


def selectable() -> tuple[str, ...]:
    """The `SELECTABLE` forms that run here (``jit`` and ``bf16-jit`` need numba and
    ``LOWBIT_JIT`` not 0)."""
    return (SELECTABLE if pq_jit.available()
            else tuple(f for f in SELECTABLE if f not in ("jit", "bf16-jit")))


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
    """int32 (out * n_blocks,) flat indices ``j * k + a[o, j]`` into the (n_blocks * k) rows of
    the table (the ``lut`` form's state: 4 bytes per block)."""
    offsets = torch.arange(cw.n_blocks, dtype=torch.int64) * cw.k  # (n_blocks,)
    return (cw.indices() + offsets).to(torch.int32).reshape(-1)


def lut_bags(cw: CodebookWeight) -> torch.Tensor:
    """int32 (out,) start of each output's bag in `lut_index` (``o * n_blocks``)."""
    return torch.arange(0, cw.rows * cw.n_blocks, cw.n_blocks, dtype=torch.int32)


def lutg_index(cw: CodebookWeight) -> torch.Tensor:
    """int64 (n_blocks, out) centroid indices, transposed (the ``lutg`` form's state)."""
    return cw.indices().t().contiguous()


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
               bags: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``centroids`` float32 (k, block_size), ``flat_index`` int32 (out * n_blocks,) from
    `lut_index`, ``bags`` int32 (out,) from `lut_bags`."""
    x = x2d.float()
    m = x.shape[0]
    bs = centroids.shape[1]
    t = torch.mm(x.reshape(-1, bs), centroids.t())  # (M * n_blocks, k)
    table = t.view(-1, 1) if m == 1 else t.view(m, -1).t().contiguous()  # (n_blocks * k, M)
    y = torch.embedding_bag(table, flat_index, bags, False, 0)[0]  # (out, M); mode 0: sum
    y = y.view(1, -1) if m == 1 else y.t()  # (M, out)
    return y if bias is None else torch.add(y, bias)


def lutg_linear(x2d: torch.Tensor, centroids: torch.Tensor, index_t: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``centroids`` float32 (k, block_size), ``index_t`` int64 (n_blocks, out) from
    `lutg_index`."""
    x = x2d.float()
    m = x.shape[0]
    k, bs = centroids.shape
    nb, out = index_t.shape
    t = torch.mm(x.reshape(-1, bs), centroids.t()).view(m, nb, k)  # (M, n_blocks, k)
    y = torch.gather(t, 2, index_t.expand(m, nb, out)).sum(1)  # (M, out)
    return y if bias is None else y.add_(bias)


def bf16_linear(x2d: torch.Tensor, centroids: torch.Tensor, flat_assign: torch.Tensor,
                out_features: int, bias: torch.Tensor | None, tile_rows: int = 0,
                compiled: bool = False, rows: "pq_jit.RowGather | None" = None) -> torch.Tensor:
    """fp32 (M, out): bf16 activations times the weight gathered from bf16 ``centroids``
    (k, block_size) by ``flat_assign`` (int32 (out * n_blocks,)), tile by tile (``TILE_BYTES``
    of fp32-equivalent rows); the bf16 GEMM output widened to fp32 and the fp32 bias added in one
    op. ``compiled``: gather by a compiled `pq_jit.RowGather` (the ``bf16-jit`` form) instead of
    ``index_select``; ``rows``: one already prepared on these centroids and assignments (what a
    layer passes). The weight is the same bit for bit."""
    if rows is None:
        rows = pq_jit.RowGather(centroids, flat_assign, compiled=compiled)
    m, inp = x2d.shape
    tile = min(tile_rows or max(1, TILE_BYTES // (4 * inp)), out_features)
    if tile == out_features:  # one tile: no scratch, no copy
        x, w = x2d.to(torch.bfloat16), rows()  # w: (out * in,) bf16
        y = torch.mm(x, w.as_strided((inp, out_features), (1, inp)))  # W^T in one view op
        return y.float() if bias is None else torch.add(y, bias)  # bf16 + fp32: fp32, one pass
    x = x2d.to(torch.bfloat16)
    bs = centroids.shape[1]
    nb = inp // bs
    buf = torch.empty(tile * nb, bs, dtype=torch.bfloat16)  # (tile * n_blocks, block_size)
    y = torch.empty(m, out_features)
    for r0 in range(0, out_features, tile):
        n = min(tile, out_features - r0)
        part = rows(buf[:n * nb], r0 * nb, (r0 + n) * nb)
        y[:, r0:r0 + n] = torch.mm(x, part.view(n, inp).t())  # (M, n), bf16 -> fp32
    return y if bias is None else y.add_(bias)


def ref_linear(x2d: torch.Tensor, cw: CodebookWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference twin: dequantize by `primitives.codebook`, fp32 matmul."""
    return F.linear(x2d.float(), cw.dequantize(torch.float32).reshape(cw.rows, cw.cols), bias)


def ref_bf16_linear(x2d: torch.Tensor, cw: CodebookWeight,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """The ``bf16`` form's twin: the reference weight rounded to bf16, one bf16 GEMM."""
    w = cw.dequantize(torch.float32).reshape(cw.rows, cw.cols).to(torch.bfloat16)
    y = F.linear(x2d.to(torch.bfloat16), w).float()
    return y if bias is None else y.add_(bias)
