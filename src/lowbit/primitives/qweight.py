"""`QuantizedWeight`: packed codes plus the parameters that map them back to floats."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import QuantizationError, SchemeError
from ..spec import QuantSpec
from .affine import (as_2d, as_groups, code_range, dequantize_codes, params_from_range,
                     quantize_codes, scale_dtype, zero_point_dtype)
from .packing import pack, packed_cols, unpack
from .metrics import db_from_sums
from .ranges import choose_range


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized tensor in lowbit's file layout.

    qdata:      uint8 (rows, packed_cols), codes packed per row (see `primitives.packing`)
    scale:      (rows, n_groups) in the spec's scale dtype; (1, 1) per tensor
    zero_point: (rows, n_groups) like scale, or None for symmetric specs; uint8 codes for the
                spec's "int" zero point form, the scale dtype for the "float" form
    shape:      the float tensor's shape; rows = shape[0], cols = prod(shape[1:])
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]

    KIND = "affine"  # the weight kind's name in file headers and module registries
    META_KEYS = ("spec", "shape")  # a header entry's fields for `meta`

    @staticmethod
    def tensor_names(spec: QuantSpec) -> tuple[str, ...]:
        """The tensors this kind owns (and a file stores) for ``spec``."""
        return ("qdata", "scale") if spec.symmetric else ("qdata", "scale", "zero_point")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.tensor_names(self.spec)}

    def meta(self) -> dict[str, Any]:
        """Everything besides the tensors that rebuilds this weight (JSON)."""
        return {"spec": self.spec.to_dict(), "shape": list(self.shape)}

    @classmethod
    def tensor_names_for(cls, meta: dict[str, Any], name: str = "tensor") -> tuple[str, ...]:
        return cls.tensor_names(_parse_meta(meta, name)[0])

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor | None], meta: dict[str, Any],
                     name: str = "tensor") -> "QuantizedWeight":
        """Rebuild from `tensors()` and `meta()`; shapes, dtypes and values checked."""
        spec, shape = _parse_meta(meta, name)
        qw = cls(tensors.get("qdata"), tensors.get("scale"), tensors.get("zero_point"), spec, shape)
        qw.check(name)
        qw.validate(name)
        return qw

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        n = 1
        for d in (self.shape[1:] if len(self.shape) > 1 else self.shape):
            n *= d
        return n

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes (rows, cols)."""
        return unpack(self.qdata, self.spec.bits, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor these codes stand for, in the original shape."""
        q = as_groups(self.codes(), self.spec)
        return dequantize_codes(q, self.scale, self.zero_point, self.spec, dtype).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this weight takes in a file: codes + scales + zero points."""
        n = self.qdata.numel() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += self.zero_point.numel() * self.zero_point.element_size()
        return n

    def check(self, name: str = "tensor") -> None:
        """Raise if the tensors' shapes or dtypes disagree with spec and shape."""
        rows, cols = self.rows, self.cols
        groups = {"tensor": (1, 1), "group": (rows, cols // (self.spec.group_size or 1))}
        want_scale = groups.get(self.spec.granularity, (rows, 1))
        want = {"qdata": ((rows, packed_cols(cols, self.spec.bits)), torch.uint8),
                "scale": (want_scale, scale_dtype(self.spec))}
        if not self.spec.symmetric:
            want["zero_point"] = (want_scale, zero_point_dtype(self.spec))
        for key, (shape, dtype) in want.items():
            t = getattr(self, key)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                found = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise QuantizationError(f"{name}.{key}: expected {shape} {dtype}, found {found}")

    def validate(self, name: str = "tensor") -> None:
        """Raise unless values are usable: scales finite and > 0, zero points finite, every code
        (and padding) within the spec's code range. Shapes must already pass `check`."""
        scale = self.scale.float()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise QuantizationError(f"{name}.scale: scales must be finite and > 0")
        if self.zero_point is not None and not bool(torch.isfinite(self.zero_point.float()).all()):
            raise QuantizationError(f"{name}.zero_point: zero points must be finite")
        qmin, qmax = code_range(self.spec)
        if self.zero_point is not None and self.zero_point.dtype == torch.uint8 \
                and self.zero_point.numel() and int(self.zero_point.max()) > qmax:
            raise QuantizationError(f"{name}.zero_point: integer zero points must lie in [0, {qmax}], "
                                    f"found {int(self.zero_point.max())}")
        bits, cols = self.spec.bits, self.cols
        slots = packed_cols(cols, bits) * 8 // bits if bits in (2, 3, 4, 8) else cols
        if bits in (2, 3, 4, 8) and qmin == 0 and slots == cols:
            return  # every bit pattern is a valid code and there is no padding
        # 8-bit and 5..7-bit codes sit one per byte (the byte is the code); others are unpacked
        stored = self.qdata if bits >= 5 else unpack(self.qdata, bits, slots)
        if slots > cols and bool(stored[:, cols:].any()):
            raise QuantizationError(f"{name}.qdata: padding bits must be zero")
        codes = stored[:, :cols]
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise QuantizationError(f"{name}.qdata: codes must lie in [{qmin}, {qmax}], found "
                                    f"[{int(codes.min())}, {int(codes.max())}]")


def _parse_meta(meta: dict[str, Any], name: str) -> tuple[QuantSpec, tuple[int, ...]]:
    try:
        spec = QuantSpec.from_dict(meta["spec"])
        shape = tuple(int(d) for d in meta["shape"])
    except SchemeError as exc:
        raise QuantizationError(f"{name}: bad spec in metadata: {exc}") from None
    except (KeyError, TypeError, ValueError):
        raise QuantizationError(f"{name}: metadata needs 'spec' and an integer 'shape', "
                                f"found {meta!r:.200}") from None
    if not shape or min(shape) < 1:
        raise QuantizationError(f"{name}: shape must be positive integers, found {shape}")
    return spec, shape


# Row blocks of about this many elements bound the float temporaries of quantizing (and of
# measuring SQNR) to a few MiB whatever the weight's size; results do not depend on it (every
# granularity but "tensor" is row-local, and per-tensor weights are done whole).
BLOCK_ELEMENTS = 1 << 15


def row_blocks(rows: int, cols: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """[(r0, r1), ...] covering ``rows``: one block for per-tensor specs."""
    if spec.granularity == "tensor":
        return [(0, rows)]
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> QuantizedWeight:
    """Quantize a float tensor (any shape; handled as (shape[0], rest)) under ``spec``, block of
    rows by block (`row_blocks`), into preallocated outputs."""
    if not torch.is_floating_point(w):
        raise QuantizationError(f"{name}: expected a floating-point tensor, found {w.dtype}")
    x2d = as_2d(w.detach())
    rows, cols = x2d.shape
    as_groups(x2d, spec, name)  # group divisibility, before any work
    blocks = row_blocks(rows, cols, spec)
    bad = sum(int((~torch.isfinite(x2d[r0:r1])).sum()) for r0, r1 in blocks)
    if bad:
        raise QuantizationError(f"{name}: weight has {bad} NaN/Inf values; refusing to quantize")
    n_params = (1, 1) if spec.granularity == "tensor" else (
        rows, cols // spec.group_size if spec.granularity == "group" else 1)
    qdata = torch.empty(rows, packed_cols(cols, spec.bits), dtype=torch.uint8)
    scale = torch.empty(n_params, dtype=scale_dtype(spec))
    zero_point = None if spec.symmetric else torch.empty(n_params, dtype=zero_point_dtype(spec))
    lost = [0, 0, 0.0]  # groups lost to underflow, groups, their largest |value|
    for r0, r1 in blocks:
        s, z, packed = _quantize_block(x2d[r0:r1], spec, name, lost)
        qdata[r0:r1] = packed
        p0, p1 = (0, 1) if spec.granularity == "tensor" else (r0, r1)
        scale[p0:p1] = s
        if zero_point is not None:
            zero_point[p0:p1] = z
    if lost[0]:
        warnings.warn(f"{name}: {lost[0]} of {lost[1]} groups (values up to {lost[2]:.3g}) underflow "
                      f"{spec.scale_dtype} scales and dequantize to zero; use scale_dtype='float32' "
                      "(suffix -sfloat32)", stacklevel=2)
    return QuantizedWeight(qdata, scale, zero_point, spec, tuple(w.shape))


def _quantize_block(x2d: torch.Tensor, spec: QuantSpec, name: str, lost: list):
    """(scale, zero_point, packed codes) of a block of rows; ``lost`` accumulates underflow."""
    x2d = x2d.float()
    xg = as_groups(x2d, spec, name)  # (R, G, S)
    lo, hi = choose_range(xg, spec)
    scale, zero_point = params_from_range(lo, hi, spec)
    if not torch.isfinite(scale).all() or (zero_point is not None and not torch.isfinite(zero_point).all()):
        raise QuantizationError(f"{name}: values up to {x2d.abs().max().item():.3g} overflow "
                                f"{spec.scale_dtype} scales; use scale_dtype='float32' (suffix -sfloat32)")
    amax = xg.abs().amax(dim=-1)  # (R, G)
    gone = (amax > 0) & (amax < 0.5 * scale.float())
    lost[0] += int(gone.sum())
    lost[1] += gone.numel()
    if bool(gone.any()):
        lost[2] = max(lost[2], float(amax[gone].max()))
    codes = quantize_codes(xg, scale, zero_point, spec).reshape(x2d.shape)
    return scale, zero_point, pack(codes, spec.bits)


def weight_sqnr_db(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """`metrics.sqnr_db` of ``w`` vs ``qw.dequantize()``, summed block of rows by block."""
    x2d = as_2d(w.detach())
    signal = noise = 0.0
    for r0, r1 in row_blocks(qw.rows, qw.cols, qw.spec):
        p0, p1 = (0, 1) if qw.spec.granularity == "tensor" else (r0, r1)
        zp = None if qw.zero_point is None else qw.zero_point[p0:p1]
        codes = as_groups(unpack(qw.qdata[r0:r1], qw.spec.bits, qw.cols), qw.spec)
        approx = dequantize_codes(codes, qw.scale[p0:p1], zp, qw.spec).reshape(r1 - r0, -1)
        ref = x2d[r0:r1].double()
        noise += (ref - approx.double()).square().sum().item()
        signal += ref.square().sum().item()
    return db_from_sums(signal, noise)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Quantize and dequantize in one go; same dtype and shape as ``w``."""
    return quantize_weight(w, spec, name).dequantize(w.dtype)
