"""The affine quantization map: the only rounding and clamping code in lowbit.

Every tensor is handled as a 2-D view ``(rows, cols)`` (a Linear weight is ``(out, in)``, a conv
weight ``(out, in*kh*kw)``, an embedding table ``(num, dim)``), split into groups along ``cols``::

    tensor   -> (1, 1, rows*cols)
    channel  -> (rows, 1, cols)          (row: the same axis, the embedding-table name for it)
    group g  -> (rows, cols // g, g)

Parameters have shape ``(rows, n_groups)`` (``(1, 1)`` per tensor). Codes are unsigned:
``q = clamp(round(x / scale + zero_point), qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.

Asymmetric zero points come in two forms (``QuantSpec.zero_point_form``):

- ``int``: the range is widened to ``[min(lo, 0), max(hi, 0)]``, ``scale = (hi - lo) / qmax`` and
  ``zero_point = clamp(round(-lo / scale), 0, qmax)`` stored as uint8. 0.0 is exactly code
  ``zero_point``; rounding the zero point shifts the grid by at most half a step, so every value in
  the widened range is still within ``scale / 2`` of the grid.
- ``float``: ``zero_point = -lo / scale`` unrounded, in the scale dtype: ``lo`` maps exactly, 0.0
  in general does not.
"""
from __future__ import annotations

import torch

from ..errors import QuantizationError
from ..spec import QuantSpec

_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# An asymmetric scale is at least max(|lo|, |hi|) * 2**-9: the zero point then stays within
# +-(512 + qmax) codes, where float16 resolves it to 0.25 of a code, so a stored zero point never
# shifts the grid by more than a quarter step (a constant row of 100.0 stays exact to 0.05).
MIN_RELATIVE_SCALE = 2.0 ** -9
# The smallest scale stored: float16's smallest subnormal keeps tiny groups (amax ~1e-4) usable.
SMALLEST_SCALE = {"float16": 2.0 ** -24, "float32": torch.finfo(torch.float32).tiny}
ROUNDING_OFFSET = 2.0 ** 23  # see round_to_codes


def scale_dtype(spec: QuantSpec) -> torch.dtype:
    return _DTYPES[spec.scale_dtype]


def zero_point_dtype(spec: QuantSpec) -> torch.dtype | None:
    """The stored zero point's dtype: None (symmetric), uint8 (integer codes) or the scale dtype."""
    if spec.symmetric:
        return None
    return torch.uint8 if spec.zero_point_form == "int" else scale_dtype(spec)


def code_range(spec: QuantSpec) -> tuple[int, int]:
    """Smallest and largest code. Symmetric specs drop code 0 so that +-amax are both exact."""
    return (1 if spec.symmetric else 0), spec.qmax


def implicit_zero_point(spec: QuantSpec) -> int:
    return 1 << (spec.bits - 1)


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """(d0, d1, ...) -> (d0, d1*...); a 1-D tensor becomes one row."""
    return x.reshape(1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1)


def group_mismatch(cols: int, spec: QuantSpec) -> str | None:
    """Why ``cols`` columns cannot be split into the spec's groups, or None (the one place)."""
    if spec.granularity == "group" and cols % spec.group_size:
        return f"{cols} input columns are not divisible by group_size {spec.group_size}"
    return None


def check_groupable(shape2d: tuple[int, int], spec: QuantSpec, name: str = "tensor") -> None:
    why = group_mismatch(shape2d[1], spec)
    if why:
        raise QuantizationError(f"{name}: {why}")


def as_groups(x2d: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """(rows, cols) -> (rows or 1, n_groups, group_len) per the spec's granularity."""
    rows, cols = x2d.shape
    check_groupable((rows, cols), spec, name)
    if spec.granularity == "tensor":
        return x2d.reshape(1, 1, rows * cols)
    if spec.granularity == "group":
        return x2d.reshape(rows, cols // spec.group_size, spec.group_size)
    return x2d.reshape(rows, 1, cols)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (stored dtype) for per-group ranges ``[lo, hi]`` of shape (R, G).

    Constant and all-zero groups get the smallest positive scale, never a division by zero.
    """
    dt = scale_dtype(spec)
    tiny = SMALLEST_SCALE[spec.scale_dtype]
    lo, hi = lo.float(), hi.float()
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return _round_up((amax / (implicit_zero_point(spec) - 1)).clamp(min=tiny), dt), None
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    if spec.zero_point_form == "int":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # 0.0 inside the range, so on the grid
    floor = torch.maximum(lo.abs(), hi.abs()) * MIN_RELATIVE_SCALE
    scale = _round_up(torch.maximum((hi - lo) / spec.qmax, floor).clamp(min=tiny), dt)
    zero_point = -lo / scale.float()
    if spec.zero_point_form == "int":
        return scale, torch.round(zero_point).clamp_(0, spec.qmax).to(torch.uint8)
    return scale, zero_point.to(dt)


def _round_up(scale: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Cast to the stored dtype without shrinking: a scale rounded down would leave the range's
    ends outside the grid (float16 subnormals are 3% apart near 1e-6)."""
    stored = scale.to(dt)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < scale, up, stored)


def quantize_codes(xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   spec: QuantSpec) -> torch.Tensor:
    """Grouped floats (R, G, S) -> uint8 codes (R, G, S): ``clamp(round(x / scale + zp))``."""
    qmin, qmax = code_range(spec)
    zp = _zp(zero_point, spec)
    q = xg.float() / scale.float().unsqueeze(-1)  # a new tensor: the steps below work in place
    # clamping to integer bounds before rounding gives the same codes as after it
    return round_to_codes(q.add_(zp).clamp_(qmin, qmax))


def round_to_codes(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes from float32 values already clamped to [0, 255], rounded half to even exactly
    as ``torch.round(t).to(torch.uint8)`` (tests/unit/test_round_to_codes.py checks it), in place.

    Adding 2**23 rounds: float32 has 23 fraction bits, so ``2**23 + t`` (for 0 <= t < 2**23) is
    representable only at integers and IEEE addition rounds the exact sum to the nearest, ties to
    even; the integer then sits in the low bits of the float's bit pattern (``0x4B000000 + code``),
    and an int32 -> uint8 conversion keeps the low byte. Two vectorized passes: 3-4x faster on an
    AMD EPYC with torch 2.13 than ``round_`` then the float -> uint8 conversion (not vectorized).
    NaN gives code 0. ``out`` (uint8, ``t``'s shape, e.g. a row block of a larger result) receives
    the codes by the same int32 -> uint8 conversion, with no temporary.
    """
    bits = t.add_(ROUNDING_OFFSET).view(torch.int32)
    return bits.to(torch.uint8) if out is None else out.copy_(bits)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes (R, G, S) -> floats (R, G, S): ``(q - zero_point) * scale``."""
    zp = _zp(zero_point, spec)
    return ((q.float() - zp) * scale.float().unsqueeze(-1)).to(dtype)


def zero_points(zero_point: torch.Tensor | None, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The zero point of every group as float32 (R, G): the stored one, or the implicit
    ``2**(bits-1)`` of a symmetric spec. The one place a zero point is resolved."""
    if spec.symmetric:
        return torch.full(scale.shape, float(implicit_zero_point(spec)))
    return zero_point.float()


def _zp(zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | float:
    if spec.symmetric:  # a scalar broadcasts for free
        return float(implicit_zero_point(spec))
    return zero_points(zero_point, zero_point, spec).unsqueeze(-1)


def fake_quantize_groups(xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                         spec: QuantSpec) -> torch.Tensor:
    """Round trip (R, G, S) -> (R, G, S) in float32."""
    return dequantize_codes(quantize_codes(xg, scale, zero_point, spec), scale, zero_point, spec)
