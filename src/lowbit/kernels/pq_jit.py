"""The ``jit`` form of a product-quantized Linear: a lookup table built and summed in one compiled
loop (`kernels.jit`, numba), and its plain-torch twin.

Asymmetric distance computation (Jegou et al., "Product Quantization for Nearest Neighbor
Search", TPAMI 2011), as in the ``lut`` / ``lutg`` forms of `kernels.pq`, fused: per input block
``b`` and row ``m`` the table of dot products with every centroid, ``T[c] = x[m, b] . centroid[c]``
(k floats, 1 KB at k = 256: it stays in L1), is built and at once added into every output,
``y[m, n] += T[code[b, n]]``, before the next blocks (four at a time). No (M, n_blocks, k)
table is ever written, no index is widened to int64, and the layer costs one call instead of two
or three torch ops, so at few rows (a 384x384 layer's GEMV is 14-25 us) the per-op cost no
longer dominates.

State (derived from the codebook, `jit_centroids` and `jit_codes`): ``cent_t`` float32
(block_size, k), the centroids transposed so that building T runs along k; ``codes_t`` (n_blocks,
out), the assignments transposed so that one block's codes for all outputs are contiguous:
uint8 for k <= 256 (1 byte per block, the stored assignments' size), int32 above.

Sums (`_define_pq`): T[c] by products in pairs, ``((x0 c0 + x1 c1) + (x2 c2 + x3 c3)) + ...``
(an odd last product last); y[m, n] by groups of four blocks, ``y += (T0 + T1) + (T2 + T3)``,
groups in order, then the last n_blocks % 4 blocks one by one, then the bias. Pairs and fours
make half the passes over T and a quarter over y: 25-45% less time than one product and one block
at a time at 1-8 rows. The twin (`jit_linear_torch`) builds T by one GEMM and sums by gather and
sum, in another order: parity within a float budget (tests/parity/test_pq_jit.py). No fastmath.

Threads: from `jit.PARALLEL_MIN` lookups (M * out * n_blocks) while torch runs several threads,
``pq_lut_par`` splits the outputs into one span per thread; each span builds its own T (the
build is in * k multiply-adds a row, the lookups out * n_blocks: small beside them on the shapes
that reach the threshold).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import jit
from ..primitives.codebook import CodebookWeight

KERNEL = "pq_lut"
GATHER = "pq_gather"  # table names: pq_gather1 / pq_gather2 (units a row), each with a _par twin
# a centroid row is copied in units: an 8-byte row as one int64, a 16-byte row as one complex128 (one
# 128-bit load and store: 18 us against 23 us for two int64 words on 384x384 bf16 at block 8,
# here), a 32-byte row as two complex128. bf16 blocks of 4/8/16, fp32 blocks of 2/4/8.
GATHER_UNITS = {8: (torch.int64, 1), 16: (torch.complex128, 1), 32: (torch.complex128, 2)}
GATHER_PARALLEL_MIN = 1 << 12


def jit_centroids(cw: CodebookWeight) -> torch.Tensor:
    """float32 (block_size, k): the centroids transposed (the ``jit`` form's state)."""
    return cw.centroids.float().t().contiguous()


def jit_codes(cw: CodebookWeight) -> torch.Tensor:
    """(n_blocks, out) centroid indices, transposed: uint8 for k <= 256, else int32."""
    dtype = torch.uint8 if cw.k <= 256 else torch.int32
    return cw.indices().t().to(dtype).contiguous()


def available() -> bool:
    """Whether the compiled kernel runs here (numba installed and ``LOWBIT_JIT`` not 0)."""
    return jit.kernel(KERNEL, 0, define=_define_pq) is not None


def jit_linear(x2d: torch.Tensor, cent_t: torch.Tensor, codes_t: torch.Tensor,
               bias: torch.Tensor | None, arrays: tuple | None = None) -> torch.Tensor:
    """float32 (M, out) = x @ W^T + bias with W = centroids[codes]: the compiled kernel, or
    `jit_linear_torch` (its twin) where compiled kernels are off. ``cent_t`` (block_size, k)
    from `jit_centroids`, ``codes_t`` (n_blocks, out) from `jit_codes`; ``arrays``, the numpy
    views `jit_arrays` makes of them and the bias, kept by a layer between calls (each
    ``.numpy()`` costs about 0.7 us, the whole GEMV of a 384x384 layer 14-25 us). Inference only."""
    nb, out = codes_t.shape
    run = jit.kernel(KERNEL, x2d.shape[0] * out * nb, define=_define_pq)
    if run is None:
        return jit_linear_torch(x2d, cent_t, codes_t, bias)
    if x2d.requires_grad:
        x2d = x2d.detach()
    if x2d.dtype != torch.float32 or not x2d.is_contiguous():
        x2d = x2d.float().contiguous()
    c, a, b = arrays if arrays is not None else jit_arrays(cent_t, codes_t, bias)
    return torch.from_numpy(run(x2d.numpy(), c, a, b, torch.get_num_threads()))


def jit_arrays(cent_t: torch.Tensor, codes_t: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(cent_t, codes_t, bias) as the numpy arrays the kernel takes (views sharing the tensors'
    memory; a float32 zero bias when there is none)."""
    out = codes_t.shape[1]
    b = (np.zeros(out, np.float32) if bias is None
         else bias.detach().float().contiguous().numpy())
    return cent_t.numpy(), codes_t.numpy(), b


class RowGather:
    """``out[i] = centroids[flat_assign[lo + i]]`` for a span ``lo:hi`` of the assignments: the
    decoded weight of the ``bf16-jit`` form (`pq.bf16_linear`), prepared once per layer state.
    ``centroids`` (k, block_size) and ``out`` (n, block_size) of one dtype, ``flat_assign`` int32
    (n_total,). Where compiled kernels run and a centroid row is 8, 16 or 32 bytes
    (`GATHER_UNITS`), one compiled loop copies whole rows as 8- or 16-byte units (over numba's
    threads from `GATHER_PARALLEL_MIN` 64-bit words while torch runs several); otherwise, and with
    ``compiled=False``, its twin ``torch.index_select``. A copy: equal bit for bit
    (tests/parity/test_pq_jit.py).

    The numpy views the kernel reads are made here, once: per call they cost 4-5 us, a fifth of
    the copy itself on a 384x384 weight (a layer keeps its RowGather with its derived state)."""

    __slots__ = ("centroids", "flat_assign", "kernel_name", "_unit", "_per_row", "_cent", "_assign",
                 "_n", "_row_words")

    def __init__(self, centroids: torch.Tensor, flat_assign: torch.Tensor,
                 compiled: bool = True) -> None:
        self.centroids, self.flat_assign = centroids, flat_assign
        self.kernel_name: str | None = None
        self._n = flat_assign.shape[0]
        self._row_words = centroids.shape[1] * centroids.element_size() // 8
        unit = GATHER_UNITS.get(centroids.shape[1] * centroids.element_size())
        if (compiled and unit is not None and centroids.dim() == 2 and centroids.is_contiguous()
                and flat_assign.dtype == torch.int32 and flat_assign.dim() == 1
                and flat_assign.is_contiguous() and not centroids.requires_grad):
            dtype, per_row = unit
            c = centroids.view(dtype)  # (k, per_row)
            self._cent = (c.view(-1) if per_row == 1 else c).numpy()
            self._assign = flat_assign.numpy()
            self._unit, self._per_row = dtype, per_row
            self.kernel_name = f"{GATHER}{per_row}"

    def kernel_args(self, out: torch.Tensor, lo: int, hi: int) -> tuple:
        """The compiled kernel's arrays for ``out`` and the span ``lo:hi`` (without ``tasks``)."""
        o = out.view(self._unit)
        o = o.view(-1) if self._per_row == 1 else o.view(hi - lo, self._per_row)
        return self._cent, self._assign[lo:hi], o.numpy()

    def __call__(self, out: torch.Tensor | None = None, lo: int = 0,
                 hi: int | None = None) -> torch.Tensor:
        """Rows ``lo:hi`` (all by default) into ``out`` (n, block_size), or into a fresh 1-D
        tensor of n * block_size values when ``out`` is None (allocated by numpy, so that the
        kernel's view of it costs nothing; the caller views it as it needs)."""
        n = (self._n if hi is None else hi) - lo
        run = None
        if self.kernel_name is not None and (out is None or out.is_contiguous()):
            run = jit.kernel(self.kernel_name, n * self._row_words, define=_define_gather,
                             parallel_min=GATHER_PARALLEL_MIN)
        if run is None:
            idx = self.flat_assign[lo:lo + n]
            if out is None:
                return torch.index_select(self.centroids, 0, idx).view(-1)
            return torch.index_select(self.centroids, 0, idx, out=out)
        if out is not None:
            run(*self.kernel_args(out, lo, lo + n), torch.get_num_threads())
            return out
        a = np.empty(n * self._per_row, self._cent.dtype)
        run(self._cent, self._assign[lo:lo + n], a if self._per_row == 1 else a.reshape(n, 2),
            torch.get_num_threads())
        return torch.from_numpy(a).view(self.centroids.dtype)


def gather_rows(centroids: torch.Tensor, flat_assign: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """``out[i] = centroids[flat_assign[i]]`` by a one-off `RowGather` (a layer keeps its own)."""
    return RowGather(centroids, flat_assign)(out)


def _define_gather() -> dict[str, Callable]:
    """``pq_gather1`` (one unit a row: 1-D arrays) and ``pq_gather2`` (two: (n, 2) arrays), each
    with a ``_par`` twin (rows split over numba's threads), all ``(cent, assign (n,) i32, out,
    tasks int) -> None`` for int64 or complex128 units (numba compiles one body per unit type).
    A copy moves the unit's bits through a register without arithmetic: NaN payloads and -0.0
    survive (tested)."""
    from numba import njit, prange

    @njit(inline="always")
    def span1(cent, assign, out, lo, hi):
        for i in range(lo, hi):
            out[i] = cent[assign[i]]

    @njit(inline="always")
    def span2(cent, assign, out, lo, hi):
        for i in range(lo, hi):
            j = assign[i]
            out[i, 0] = cent[j, 0]
            out[i, 1] = cent[j, 1]

    # four named kernels, not one factory: numba's disk cache keys a kernel on its name and line,
    # so two kernels made by one factory would share a cache entry
    @njit(cache=True, nogil=True)
    def pq_gather1(cent, assign, out, tasks):
        span1(cent, assign, out, 0, assign.shape[0])

    @njit(cache=True, nogil=True, parallel=True)
    def pq_gather1_par(cent, assign, out, tasks):
        n = assign.shape[0]
        step = (n + tasks - 1) // tasks
        for t in prange(tasks):
            span1(cent, assign, out, t * step, min(n, (t + 1) * step))

    @njit(cache=True, nogil=True)
    def pq_gather2(cent, assign, out, tasks):
        span2(cent, assign, out, 0, assign.shape[0])

    @njit(cache=True, nogil=True, parallel=True)
    def pq_gather2_par(cent, assign, out, tasks):
        n = assign.shape[0]
        step = (n + tasks - 1) // tasks
        for t in prange(tasks):
            span2(cent, assign, out, t * step, min(n, (t + 1) * step))

    return {"pq_gather1": pq_gather1, "pq_gather1_par": pq_gather1_par,
            "pq_gather2": pq_gather2, "pq_gather2_par": pq_gather2_par}


def jit_linear_torch(x2d: torch.Tensor, cent_t: torch.Tensor, codes_t: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The twin, in torch ops on the same state: the table by one GEMM, gather, sum over blocks."""
    x = x2d.float()
    m = x.shape[0]
    bs, k = cent_t.shape
    nb, out = codes_t.shape
    t = torch.mm(x.reshape(-1, bs), cent_t).view(m, nb, k)  # (M, n_blocks, k)
    y = torch.gather(t, 2, codes_t.long().expand(m, nb, out)).sum(1)  # (M, out)
    return y if bias is None else y.add_(bias)


def _define_pq() -> dict[str, Callable]:
    """``pq_lut`` (calling thread) and ``pq_lut_par`` (outputs split over numba's threads), both
    ``(x (M, in) f32, cent_t (bs, k) f32, codes_t (n_blocks, out) u8/i32, bias (out,) f32,
    tasks int) -> y (M, out) f32``; ``tasks`` (torch's thread count) only shapes the parallel
    split. Compiled on first call, cached on disk (keyed on this file's source)."""
    import numpy as np
    from numba import njit, prange

    f32 = np.float32
    serial = njit(cache=True, nogil=True)
    parallel = njit(cache=True, nogil=True, parallel=True)
    lut_span, add_bias = _lut_bodies()

    @serial
    def pq_lut(x, cent_t, codes_t, bias, tasks):
        y = np.zeros((x.shape[0], codes_t.shape[1]), f32)
        lut_span(x, cent_t, codes_t, y, 0, codes_t.shape[1])
        return add_bias(y, bias)

    @parallel
    def pq_lut_par(x, cent_t, codes_t, bias, tasks):
        n_out = codes_t.shape[1]
        y = np.zeros((x.shape[0], n_out), f32)
        span = (n_out + tasks - 1) // tasks
        for t in prange(tasks):
            lut_span(x, cent_t, codes_t, y, t * span, min(n_out, (t + 1) * span))
        return add_bias(y, bias)

    return {"pq_lut": pq_lut, "pq_lut_par": pq_lut_par}


def _lut_bodies() -> tuple[Callable, Callable]:
    """The inlined bodies of `_define_pq`'s kernels: ``lut_span`` and ``add_bias``."""
    import numpy as np
    from numba import njit

    f32 = np.float32
    body = njit(inline="always")  # no fastmath: sums in the documented order

    build_row = _build_row()

    @body
    def lut_span(x, cent_t, codes_t, y, n_lo, n_hi):
        """y[:, n_lo:n_hi] += the tables' entries the codes pick, four blocks a pass:
        y += (T0[a0] + T1[a1]) + (T2[a2] + T3[a3]) (a quarter of the loads and stores of y),
        the last n_blocks % 4 blocks one by one; four k-float tables live at a time."""
        bs, k = cent_t.shape
        nb = codes_t.shape[0]
        rows = np.empty((4, k), f32)
        nb4 = nb - nb % 4
        for b in range(0, nb4, 4):  # blocks outer: their codes stay in cache across rows
            for m in range(x.shape[0]):
                for g in range(4):
                    build_row(x, m, (b + g) * bs, cent_t, rows[g])
                r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
                c0, c1, c2, c3 = codes_t[b], codes_t[b + 1], codes_t[b + 2], codes_t[b + 3]
                for n in range(n_lo, n_hi):
                    y[m, n] += (r0[c0[n]] + r1[c1[n]]) + (r2[c2[n]] + r3[c3[n]])
        for b in range(nb4, nb):
            for m in range(x.shape[0]):
                build_row(x, m, b * bs, cent_t, rows[0])
                r0, c0 = rows[0], codes_t[b]
                for n in range(n_lo, n_hi):
                    y[m, n] += r0[c0[n]]

    @body
    def add_bias(y, bias):
        for m in range(y.shape[0]):
            for n in range(y.shape[1]):
                y[m, n] += bias[n]
        return y

    return lut_span, add_bias


def _build_row() -> Callable:
    """The inlined body that fills one block's lookup table (see `_define_pq`)."""
    from numba import njit

    body = njit(inline="always")  # no fastmath: sums in the documented order

    @body
    def build_row(x, m, base, cent_t, row):
        """row[c] = x[m, base:base + bs] . centroid c: products summed in pairs, the pairs in
        order, an odd last product last."""
        bs, k = cent_t.shape
        if bs == 1:
            x0 = x[m, base]
            for c in range(k):
                row[c] = x0 * cent_t[0, c]
            return
        x0, x1 = x[m, base], x[m, base + 1]
        for c in range(k):
            row[c] = x0 * cent_t[0, c] + x1 * cent_t[1, c]
        for j in range(2, bs - 1, 2):
            x0, x1 = x[m, base + j], x[m, base + j + 1]
            for c in range(k):
                row[c] += x0 * cent_t[j, c] + x1 * cent_t[j + 1, c]
        if bs % 2:
            x0 = x[m, base + bs - 1]
            for c in range(k):
                row[c] += x0 * cent_t[bs - 1, c]

    return build_row
