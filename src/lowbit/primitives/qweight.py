"""`QuantizedWeight`: packed codes plus the parameters that map them back to floats."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import QuantizationError, SchemeError
from ..spec import QuantSpec
from .affine import (as_2d, as_groups, code_range, dequantize_codes, params_from_range,
                     quantize_codes, scale_dtype)
from .packing import pack, packed_cols, unpack
from .ranges import choose_range


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized tensor in lowbit's file layout.

    qdata:      uint8 (rows, packed_cols), codes packed per row (see `primitives.packing`)
    scale:      (rows, n_groups) in the spec's scale dtype; (1, 1) per tensor
    zero_point: like scale, or None for symmetric specs
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
            want["zero_point"] = (want_scale, scale_dtype(self.spec))
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


def quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> QuantizedWeight:
    """Quantize a float tensor (any shape; handled as (shape[0], rest)) under ``spec``."""
    if not torch.is_floating_point(w):
        raise QuantizationError(f"{name}: expected a floating-point tensor, found {w.dtype}")
    w = w.detach()
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise QuantizationError(f"{name}: weight has {bad} NaN/Inf values; refusing to quantize")
    x2d = as_2d(w.float())
    xg = as_groups(x2d, spec, name)  # (R, G, S)
    lo, hi = choose_range(xg, spec)
    scale, zero_point = params_from_range(lo, hi, spec)
    if not torch.isfinite(scale).all() or (zero_point is not None and not torch.isfinite(zero_point).all()):
        raise QuantizationError(f"{name}: values up to {x2d.abs().max().item():.3g} overflow "
                                f"{spec.scale_dtype} scales; use scale_dtype='float32' (suffix -sfloat32)")
    _warn_underflow(xg, scale, spec, name)
    codes = quantize_codes(xg, scale, zero_point, spec).reshape(x2d.shape)
    return QuantizedWeight(pack(codes, spec.bits), scale, zero_point, spec, tuple(w.shape))


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Quantize and dequantize in one go; same dtype and shape as ``w``."""
    return quantize_weight(w, spec, name).dequantize(w.dtype)


def _warn_underflow(xg: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, name: str) -> None:
    """Groups with nonzero values all below half a step of the smallest storable scale come back
    as zeros: say so (they need float32 scales)."""
    amax = xg.abs().amax(dim=-1)  # (R, G)
    lost = (amax > 0) & (amax < 0.5 * scale.float())
    if bool(lost.any()):
        warnings.warn(f"{name}: {int(lost.sum())} of {lost.numel()} groups (values up to "
                      f"{float(amax[lost].max()):.3g}) underflow {spec.scale_dtype} scales and "
                      "dequantize to zero; use scale_dtype='float32' (suffix -sfloat32)",
                      stacklevel=3)
