"""Product quantization (PQ) of weights: k-means codebooks on blocks of consecutive columns, as in
iPQ (Stock et al., "And the Bit Goes Down", arXiv 1907.05686; Fan, Stock et al., arXiv 2004.07320).

A weight is handled as its 2-D view ``(rows, cols)`` (Linear ``(out, in)``, Conv2d
``(out, in*kh*kw)``, Embedding ``(num, dim)``) and split into sub-vectors of ``block_size``
consecutive columns: ``(rows, cols) -> (rows, n_blocks, block_size)``, ``n_blocks = cols //
block_size``. Each sub-vector is replaced by the nearest of ``k`` centroids.

File layout (``CODEBOOK_FORMAT``, version ``CODEBOOK_VERSION``), two tensors:

``centroids``: float16 or float32 ``(k, block_size)``, row ``c`` is centroid ``c``.

``assignments``: uint8 ``(rows, n_blocks * index_bytes)``; block ``j`` of row ``r`` uses centroid
``a[r, j]``. ``index_bytes`` is 1 when ``k <= 256``, else 2 (``k <= 65536``), little-endian::

    k <= 256:   byte j            = a[r, j]
    k >  256:   byte 2j           = a[r, j]        & 0xFF   (low byte first)
                byte 2j + 1       = a[r, j] >> 8

Metadata (JSON, not tensors): ``{"format": "codebook", "version": 1, "shape": [...],
"block_size": b}``; ``k`` is the centroids' row count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .affine import as_2d
from ..errors import LowbitError

CODEBOOK_FORMAT = "codebook"
CODEBOOK_VERSION = 1
MAX_CENTROIDS = 1 << 16
CENTROID_DTYPES = {"float16": torch.float16, "float32": torch.float32}
KMEANS_INITS = ("kmeans++", "random")
# points per chunk when computing distances (bounds memory to CHUNK * k floats)
DIST_CHUNK = 1 << 15


class CodebookError(LowbitError):
    """A codebook weight or k-means setting lowbit cannot accept; the message names the tensor."""


def index_bytes(k: int) -> int:
    """Bytes per stored assignment: 1 for k <= 256, 2 up to 65536."""
    if not 1 <= k <= MAX_CENTROIDS:
        raise CodebookError(f"number of centroids must be in 1..{MAX_CENTROIDS}, found {k}")
    return 1 if k <= 256 else 2


def pack_assignments(a: torch.Tensor, k: int) -> torch.Tensor:
    """int (rows, n_blocks) in [0, k) -> uint8 (rows, n_blocks * index_bytes(k)), little-endian."""
    if a.dim() != 2:
        raise CodebookError(f"assignments must be 2-D (rows, n_blocks), found {a.dim()}-D")
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k):
        raise CodebookError(f"assignments must lie in [0, {k}), found [{int(a.min())}, {int(a.max())}]")
    a = a.to(torch.int32)
    if index_bytes(k) == 1:
        return a.to(torch.uint8)
    pairs = torch.stack((a & 0xFF, a >> 8), dim=-1)  # (rows, n_blocks, 2): low byte first
    return pairs.reshape(a.shape[0], -1).to(torch.uint8)


def unpack_assignments(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_assignments`: uint8 (rows, n_blocks * index_bytes) -> int64 (rows, n_blocks)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise CodebookError(f"packed assignments must be 2-D uint8, found {packed.dim()}-D {packed.dtype}")
    if index_bytes(k) == 1:
        return packed.long()
    pairs = packed.long().reshape(packed.shape[0], -1, 2)  # (rows, n_blocks, 2)
    return pairs[..., 0] | (pairs[..., 1] << 8)


def split_blocks(w: torch.Tensor, block_size: int, name: str = "weight") -> torch.Tensor:
    """(rows, cols...) -> float32 sub-vectors (rows * n_blocks, block_size), row-major."""
    w2d = as_2d(w.detach().float())
    if not isinstance(block_size, int) or block_size < 1 or w2d.shape[1] % block_size:
        raise CodebookError(f"{name}: block_size {block_size!r} must be a positive integer dividing "
                            f"its {w2d.shape[1]} columns (Conv2d: in_channels*kh*kw)")
    return w2d.reshape(-1, block_size)  # (rows * n_blocks, block_size)


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (ties: the lowest index) and its squared distance, per point."""
    c_sq = centroids.square().sum(dim=1)  # (k,)
    idx, err = [], []
    for chunk in points.split(DIST_CHUNK):
        d = torch.addmm(c_sq, chunk, centroids.t(), alpha=-2.0)  # (n, k): |c|^2 - 2 x.c
        i = d.argmin(dim=1)
        idx.append(i)
        err.append((chunk - centroids[i]).square().sum(dim=1))
    return torch.cat(idx), torch.cat(err)


def _init_centroids(points: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    n = points.shape[0]
    if init == "random":
        return points[torch.randperm(n, generator=gen)[:k]].clone()
    # k-means++ (Arthur & Vassilvitskii 2007): next centre drawn with probability ~ D(x)^2
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (points - points[chosen[0]]).square().sum(dim=1)
    for _ in range(1, k):
        cum = d2.double().cumsum(0)  # inverse-CDF draw: no category limit, unlike multinomial
        total = float(cum[-1])
        if total > 0:
            u = torch.rand(1, generator=gen, dtype=torch.float64) * total
            i = min(int(torch.searchsorted(cum, u, right=True)), n - 1)
        else:  # every point already a centre: any point
            i = int(torch.randint(n, (1,), generator=gen))
        chosen.append(i)
        d2 = torch.minimum(d2, (points - points[i]).square().sum(dim=1))
    return points[chosen].clone()


def _update(points: torch.Tensor, idx: torch.Tensor, err: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, int]:
    """New centroids: cluster means; empty clusters re-seeded from the points with the largest
    error (distinct points, largest first). Returns the centroids and the number re-seeded."""
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, idx, points)
    counts = torch.bincount(idx, minlength=k)
    cent = sums / counts.clamp(min=1).unsqueeze(1).to(points.dtype)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        worst = err.argsort(descending=True, stable=True)[:len(empty)]
        cent[empty[:len(worst)]] = points[worst]
    return cent, len(empty)


@dataclass(frozen=True)
class KMeansResult:
    centroids: torch.Tensor  # float32 (k, block_size)
    assignments: torch.Tensor  # int64 (n_points,)
    error: float  # sum of squared distances to the assigned centroids
    iterations: int
    reseeded: int  # empty clusters re-seeded over all iterations


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, n_iter: int = 20,
           init: str = "kmeans++", tol: float | None = None) -> KMeansResult:
    """Lloyd's k-means on float32 points (n, d), seeded by ``generator``.

    Runs ``n_iter`` iterations, or stops earlier once the error improves by less than ``tol``
    (relative). Empty clusters are re-seeded from the points with the largest error.
    """
    if init not in KMEANS_INITS:
        raise CodebookError(f"unknown k-means init {init!r}; valid: {KMEANS_INITS}")
    if not 1 <= k <= points.shape[0]:
        raise CodebookError(f"k={k} centroids need 1 <= k <= the {points.shape[0]} points")
    if not isinstance(generator, torch.Generator):
        raise CodebookError("kmeans needs an explicit torch.Generator (seeded) for its randomness")
    points = points.float()
    cent = _init_centroids(points, k, init, generator)
    idx, err = assign(points, cent)
    prev, reseeded, it = float(err.sum()), 0, 0
    for it in range(1, n_iter + 1):
        cent, n_empty = _update(points, idx, err, k)
        reseeded += n_empty
        idx, err = assign(points, cent)
        cur = float(err.sum())
        if tol is not None and prev - cur <= tol * max(prev, 1e-30):
            prev = cur
            break
        prev = cur
    return KMeansResult(cent, idx, prev, it, reseeded)


@dataclass(frozen=True)
class CodebookWeight:
    """A product-quantized tensor in lowbit's codebook layout (see the module docstring).

    centroids:   float16 / float32 (k, block_size)
    assignments: uint8 (rows, n_blocks * index_bytes(k)), little-endian indices
    shape:       the float tensor's shape; rows = shape[0], cols = prod(shape[1:])
    block_size:  columns per sub-vector
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    shape: tuple[int, ...]
    block_size: int

    KIND = "codebook"  # the weight kind's name in file headers and module registries
    META_KEYS = ("format", "version", "shape", "block_size")  # a header entry's fields for `meta`

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.cols // self.block_size

    def indices(self) -> torch.Tensor:
        """int64 (rows, n_blocks) centroid indices."""
        return unpack_assignments(self.assignments, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor: each block replaced by its centroid, in the original shape."""
        w = self.centroids.to(dtype)[self.indices()]  # (rows, n_blocks, block_size)
        return w.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the two stored tensors (what a file holds for this weight)."""
        return (self.centroids.numel() * self.centroids.element_size()
                + self.assignments.numel() * self.assignments.element_size())

    @property
    def bits_per_weight(self) -> float:
        """Theoretical bits per float weight: log2(k) per block, centroids excluded."""
        return math.log2(self.k) / self.block_size if self.k > 1 else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by their names in the file."""
        return {"centroids": self.centroids, "assignments": self.assignments}

    def meta(self) -> dict[str, Any]:
        """JSON-able metadata that, with `tensors`, rebuilds this weight."""
        return {"format": CODEBOOK_FORMAT, "version": CODEBOOK_VERSION,
                "shape": list(self.shape), "block_size": self.block_size}

    @classmethod
    def tensor_names_for(cls, meta: dict[str, Any], name: str = "weight") -> tuple[str, ...]:
        """The tensors a codebook weight stores (the same for every codebook)."""
        return ("centroids", "assignments")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     name: str = "weight") -> "CodebookWeight":
        """Rebuild from `tensors()` and `meta()`; checks names, version, shapes and dtypes."""
        if meta.get("format") != CODEBOOK_FORMAT or meta.get("version") != CODEBOOK_VERSION:
            raise CodebookError(f"{name}: expected format {CODEBOOK_FORMAT!r} version "
                                f"{CODEBOOK_VERSION}, found {meta.get('format')!r} version "
                                f"{meta.get('version')!r}")
        missing = {"centroids", "assignments"} - set(tensors)
        extra = set(tensors) - {"centroids", "assignments"}
        if missing or extra:
            raise CodebookError(f"{name}: expected tensors ['assignments', 'centroids'], missing "
                                f"{sorted(missing)}, unexpected {sorted(extra)}")
        shape = meta.get("shape")
        if not isinstance(shape, (list, tuple)) or not shape or not all(
                type(d) is int and d > 0 for d in shape):
            raise CodebookError(f"{name}: shape must be positive integers, found {shape!r:.80}")
        if any(tensors[t] is None for t in ("centroids", "assignments")):
            raise CodebookError(f"{name}: centroids and assignments must both be present")
        cw = cls(tensors["centroids"], tensors["assignments"], tuple(shape), meta.get("block_size"))
        cw.check(name)
        if not cw.centroids.is_meta and not bool(torch.isfinite(cw.centroids).all()):
            raise CodebookError(f"{name}.centroids: centroids must be finite")
        return cw

    def check(self, name: str = "weight") -> None:
        """Raise if tensors disagree with shape, block size and k, or an index is out of range."""
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.cols % self.block_size:
            raise CodebookError(f"{name}: block_size {self.block_size!r} does not divide "
                                f"{self.cols} columns")
        c, a = self.centroids, self.assignments
        if c.dim() != 2 or c.shape[1] != self.block_size or c.dtype not in CENTROID_DTYPES.values():
            raise CodebookError(f"{name}.centroids: expected (k, {self.block_size}) float16/float32, "
                                f"found {tuple(c.shape)} {c.dtype}")
        want = (self.rows, self.n_blocks * index_bytes(self.k))
        if tuple(a.shape) != want or a.dtype != torch.uint8:
            raise CodebookError(f"{name}.assignments: expected {want} torch.uint8 for k={self.k}, "
                                f"found {tuple(a.shape)} {a.dtype}")
        if a.numel() and not a.is_meta and int(self.indices().max()) >= self.k:
            raise CodebookError(f"{name}.assignments: index {int(self.indices().max())} >= k={self.k}")


def quantize_codebook(w: torch.Tensor, k: int, block_size: int, generator: torch.Generator,
                      n_iter: int = 20, init: str = "kmeans++", tol: float | None = None,
                      centroid_dtype: str = "float16", name: str = "weight") -> CodebookWeight:
    """k-means product quantization of ``w`` (any shape; handled as (shape[0], rest))."""
    if centroid_dtype not in CENTROID_DTYPES:
        raise CodebookError(f"{name}: centroid_dtype must be one of {tuple(CENTROID_DTYPES)}, "
                            f"found {centroid_dtype!r}")
    if not torch.is_floating_point(w) or not torch.isfinite(w).all():
        raise CodebookError(f"{name}: expected a finite floating-point tensor")
    points = split_blocks(w, block_size, name)  # (rows * n_blocks, block_size)
    k_eff = min(k, points.shape[0])
    res = kmeans(points, k_eff, generator, n_iter, init, tol)
    rows = as_2d(w).shape[0]
    idx = res.assignments.reshape(rows, -1)  # (rows, n_blocks)
    cent = res.centroids.to(CENTROID_DTYPES[centroid_dtype])
    return CodebookWeight(cent, pack_assignments(idx, k_eff), tuple(w.shape), block_size)
