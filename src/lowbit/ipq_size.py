"""Byte accounting for product-quantized weights: real bytes (what a file's tensors hold) next to
the theoretical bits, per layer and in total, against float32.

fairseq's iPQ size tracker counted log2(k) bits per block while its files stored int64
assignments, so real files were ~8x bigger than reported. Here ``stored_bytes`` is the sum of the
stored tensors' ``numel * element_size`` (centroids + packed assignments, and float leftovers at
their own dtype), which is exactly the tensor data a safetensors file holds for them (tested
against a written file); ``theory_bits`` is ``n_blocks * log2(k)`` plus the centroids' bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .primitives.codebook import CodebookWeight

FLOAT_REFERENCE_BYTES = 4  # the report compares with float32


@dataclass(frozen=True)
class LayerSize:
    name: str
    kind: str  # "codebook" or "float" (a tensor left unquantized)
    shape: tuple[int, ...]
    float_bytes: int  # numel * 4
    centroid_bytes: int
    assignment_bytes: int
    stored_bytes: int  # real bytes of the stored tensors
    theory_bits: float  # n_blocks * log2(k) + centroid bits (codebook); stored bits (float)

    @property
    def ratio(self) -> float:
        """float32 bytes / stored bytes."""
        return self.float_bytes / self.stored_bytes if self.stored_bytes else math.inf


def codebook_size(name: str, cw: CodebookWeight) -> LayerSize:
    numel = cw.rows * cw.cols
    cent = cw.centroids.numel() * cw.centroids.element_size()
    assign = cw.assignments.numel() * cw.assignments.element_size()
    theory = cw.rows * cw.n_blocks * math.log2(cw.k) + cent * 8
    return LayerSize(name, "codebook", tuple(cw.shape), numel * FLOAT_REFERENCE_BYTES, cent, assign,
                     cent + assign, theory)


def float_size(name: str, t: torch.Tensor) -> LayerSize:
    nbytes = t.numel() * t.element_size()
    return LayerSize(name, "float", tuple(t.shape), t.numel() * FLOAT_REFERENCE_BYTES, 0, 0, nbytes,
                     nbytes * 8.0)


@dataclass(frozen=True)
class SizeReport:
    layers: tuple[LayerSize, ...]

    def total(self, kind: str | None = None) -> tuple[int, int]:
        """(float32 bytes, stored bytes) over all layers, or those of one kind."""
        rows = [r for r in self.layers if kind is None or r.kind == kind]
        return sum(r.float_bytes for r in rows), sum(r.stored_bytes for r in rows)

    @property
    def stored_bytes(self) -> int:
        return self.total()[1]

    def to_dict(self) -> dict:
        f, s = self.total()
        fq, sq = self.total("codebook")
        return {"layers": [dict(vars(r), shape=list(r.shape)) for r in self.layers],
                "float_bytes": f, "stored_bytes": s,
                "quantized_float_bytes": fq, "quantized_stored_bytes": sq}

    def __str__(self) -> str:
        head = f"{'layer':<40}{'kind':>9}{'fp32 B':>12}{'stored B':>11}{'ratio':>8}{'bits/w':>8}"
        lines = [head]
        for r in self.layers:
            bpw = r.theory_bits / (r.float_bytes / FLOAT_REFERENCE_BYTES) if r.float_bytes else 0.0
            lines.append(f"{r.name:<40}{r.kind:>9}{r.float_bytes:>12}{r.stored_bytes:>11}"
                         f"{r.ratio:>7.1f}x{bpw:>8.3f}")
        for label, kind in (("quantized layers", "codebook"), ("total", None)):
            f, s = self.total(kind)
            lines.append(f"{label:<40}{'':>9}{f:>12}{s:>11}{(f / s if s else math.inf):>7.1f}x")
        return "\n".join(lines)


def size_report(codebooks: dict[str, CodebookWeight],
                floats: dict[str, torch.Tensor] | None = None) -> SizeReport:
    """Per-layer and total bytes of ``codebooks`` (name -> weight) and float leftovers (name ->
    tensor, e.g. biases and unquantized layers), in the order given."""
    rows = [codebook_size(n, cw) for n, cw in codebooks.items()]
    rows += [float_size(n, t) for n, t in (floats or {}).items()]
    return SizeReport(tuple(rows))
