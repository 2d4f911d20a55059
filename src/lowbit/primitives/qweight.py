"""`QuantizedWeight`: packed codes plus the parameters that map them back to floats."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import QuantSpec
from .affine import (QuantizationError, as_2d, as_groups, dequantize_codes, params_from_range,
                     quantize_codes, scale_dtype, zero_point_dtype)
from .packing import pack, packed_cols, unpack
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
    codes = quantize_codes(xg, scale, zero_point, spec).reshape(x2d.shape)
    return QuantizedWeight(pack(codes, spec.bits), scale, zero_point, spec, tuple(w.shape))


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """Quantize and dequantize in one go; same dtype and shape as ``w``."""
    return quantize_weight(w, spec, name).dequantize(w.dtype)
