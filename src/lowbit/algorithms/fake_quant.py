"""Fake quantization for quantization-aware training: a straight-through estimator (STE) and LSQ.

Both round through `lowbit.primitives.affine` (``quantize_codes`` then ``dequantize_codes``), so the
forward value is bit for bit what post-training quantization with the same scale and zero point
gives; only the backward pass is defined here.

Notation per group (see `primitives.affine`): ``v = w / s + z`` (unrounded code), codes
``[qmin, qmax]``, ``w_hat = (clamp(round(v), qmin, qmax) - z) * s``.

- STE (Bengio et al. 2013, arXiv 1308.3432; the clipped form of Jacob et al. 2018, arXiv
  1712.05877): ``dL/dw = dL/dw_hat`` where the clamp leaves the rounded code unchanged
  (``qmin - 1/2 <= v < qmax + 1/2``, inside the clipping range), 0 outside. The half-code margin
  keeps the gradient of a min-max range's own ends, which a float16 zero point can put a hair
  outside ``[qmin, qmax]``.
- LSQ, learned step size (Esser et al. 2020, arXiv 1902.08153): the step ``s`` is a parameter.
  Its gradient (eq. 3 of the paper), with round's derivative taken as 1::

      dw_hat/ds = round(v) - z - w / s    if qmin <= v <= qmax
                = qmin - z                if v < qmin
                = qmax - z                if v > qmax

  scaled by ``g = 1 / sqrt(N * Q_P)`` (section 2.2), N the number of weights sharing the step
  (one group / channel / the tensor) and Q_P the number of positive levels: ``2**(b-1) - 1`` for a
  symmetric spec, ``2**b - 1`` for an asymmetric one. The zero point is not learned (LSQ+ would).
  The forward uses the step rounded up to the spec's stored scale dtype, exactly as `convert`
  will store it, so the trained forward equals the converted layer's.
"""
from __future__ import annotations

import math

import torch

from ..primitives.affine import (SMALLEST_SCALE, QuantizationError, _round_up, as_2d, as_groups,
                                 code_range, dequantize_codes, implicit_zero_point,
                                 params_from_range, quantize_codes, scale_dtype)
from ..primitives.packing import pack
from ..primitives.qweight import QuantizedWeight
from ..primitives.ranges import choose_range
from ..spec import QuantSpec

# STE: a code is clipped when rounding lands outside [qmin, qmax], i.e. v beyond half a code
STE_MARGIN = 0.5


def qparams(w: torch.Tensor, spec: QuantSpec, name: str = "weight"
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (stored dtypes, shape (R, G)) that post-training quantization would
    pick for ``w``: the primitives' range choice. The initial LSQ step."""
    w = w.detach()
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: weight has NaN/Inf values; refusing to quantize")
    xg = as_groups(as_2d(w.float()), spec, name)  # (R, G, S)
    lo, hi = choose_range(xg, spec)
    return params_from_range(lo, hi, spec)


def _zp_groups(zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | float:
    """The zero point broadcast against grouped values (R, G, S)."""
    if spec.symmetric:
        return float(implicit_zero_point(spec))
    return zero_point.float().unsqueeze(-1)


def _inside(xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            spec: QuantSpec, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrounded codes ``v`` (R, G, S) and the mask ``qmin - margin <= v <= qmax + margin``
    (the upper end strict when ``margin`` > 0)."""
    qmin, qmax = code_range(spec)
    v = xg.float() / scale.float().unsqueeze(-1) + _zp_groups(zero_point, spec)
    upper = v < qmax + margin if margin else v <= qmax
    return v, (v >= qmin - margin) & upper


class _STEFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero_point, spec, name):
        xg = as_groups(as_2d(w), spec, name)  # (R, G, S)
        codes = quantize_codes(xg, scale, zero_point, spec)
        out = dequantize_codes(codes, scale, zero_point, spec, w.dtype).reshape(w.shape)
        _, inside = _inside(xg, scale, zero_point, spec, STE_MARGIN)
        ctx.save_for_backward(inside.reshape(w.shape))
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_quantize_ste(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                      zero_point: torch.Tensor | None = None, name: str = "weight") -> torch.Tensor:
    """``w`` quantized and dequantized (same shape and dtype), gradient passed straight through
    inside the clipping range and zeroed outside. Without ``scale``, the parameters are the
    primitives' choice for ``w`` (so the forward equals `primitives.fake_quantize(w, spec)`)."""
    if scale is None:
        scale, zero_point = qparams(w, spec, name)
    return _STEFakeQuant.apply(w, scale.detach(), zero_point, spec, name)


def positive_levels(spec: QuantSpec) -> int:
    """LSQ's Q_P: codes above the zero point for a symmetric spec, all levels for an asymmetric."""
    return spec.qmax - implicit_zero_point(spec) if spec.symmetric else spec.qmax


def lsq_grad_scale(spec: QuantSpec, group_len: int) -> float:
    """LSQ's ``g = 1 / sqrt(N * Q_P)`` for a step shared by ``group_len`` weights."""
    return 1.0 / math.sqrt(group_len * positive_levels(spec))


def stored_step(step: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The step as `convert` stores it: at least the smallest scale, rounded up to the spec's
    scale dtype (never down, as in `primitives.affine.params_from_range`)."""
    s = step.detach().float().clamp(min=SMALLEST_SCALE[spec.scale_dtype])
    return _round_up(s, scale_dtype(spec))


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, step, zero_point, spec, grad_scale, name):
        scale = stored_step(step, spec)  # (R, G) in the stored dtype
        xg = as_groups(as_2d(w), spec, name)  # (R, G, S)
        codes = quantize_codes(xg, scale, zero_point, spec)
        out = dequantize_codes(codes, scale, zero_point, spec, w.dtype).reshape(w.shape)
        v, inside = _inside(xg, scale, zero_point, spec, 0.0)
        ctx.save_for_backward(codes, v, inside, scale, _zp_tensor(zero_point, spec))
        ctx.spec, ctx.grad_scale, ctx.w_shape, ctx.step_dtype = spec, grad_scale, w.shape, step.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        codes, v, inside, scale, zp = ctx.saved_tensors
        gg = grad.float().reshape(codes.shape)  # (R, G, S)
        grad_w = (gg * inside).reshape(ctx.w_shape).to(grad.dtype)
        zp = zp.unsqueeze(-1) if zp.dim() else zp
        # inside: round(v) - z - w/s = codes - v (codes are unclamped there); outside: clamp - z
        d_step = torch.where(inside, codes.float() - v, codes.float() - zp)
        grad_step = (gg * d_step).sum(dim=-1) * ctx.grad_scale  # (R, G)
        return grad_w, grad_step.to(ctx.step_dtype), None, None, None, None


def _zp_tensor(zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if spec.symmetric:
        return torch.tensor(float(implicit_zero_point(spec)))
    return zero_point.float()


def lsq_fake_quantize(w: torch.Tensor, step: torch.Tensor, spec: QuantSpec,
                      zero_point: torch.Tensor | None = None, grad_scale: float | None = None,
                      name: str = "weight") -> torch.Tensor:
    """LSQ fake quantization: ``step`` (R, G) float32 (a learned parameter) gets the LSQ gradient
    times ``grad_scale`` (default `lsq_grad_scale` for the spec's group length), ``w`` the STE
    gradient. ``zero_point`` is fixed (asymmetric specs only)."""
    rows_groups = as_groups(as_2d(w.detach()), spec, name).shape  # (R, G, S)
    if tuple(step.shape) != tuple(rows_groups[:2]):
        raise QuantizationError(f"{name}: step shape {tuple(step.shape)} does not match the "
                                f"{spec.name} parameter shape {tuple(rows_groups[:2])}")
    if (zero_point is None) != spec.symmetric:
        raise QuantizationError(f"{name}: a zero point is needed exactly for asymmetric specs "
                                f"({spec.name} is {'symmetric' if spec.symmetric else 'asymmetric'})")
    if grad_scale is None:
        grad_scale = lsq_grad_scale(spec, rows_groups[2])
    return _LSQFakeQuant.apply(w, step, zero_point, spec, grad_scale, name)


def init_step(w: torch.Tensor, spec: QuantSpec, name: str = "weight"
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial LSQ parameters from the primitives' range choice: step as float32 (R, G) (to be
    learned) and the fixed zero point (stored dtype, or None when symmetric)."""
    scale, zero_point = qparams(w, spec, name)
    return scale.float().clone(), zero_point


def quantize_with_params(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                         zero_point: torch.Tensor | None, name: str = "weight") -> QuantizedWeight:
    """The `QuantizedWeight` for ``w`` under given parameters (a learned LSQ step goes through
    `stored_step` first; a frozen observer's scale as is): what `qat.convert` stores. Its
    ``dequantize()`` equals the fake-quant forward with the same parameters bit for bit."""
    w = w.detach()
    xg = as_groups(as_2d(w.float()), spec, name)  # (R, G, S)
    want = tuple(xg.shape[:2])
    if tuple(scale.shape) != want or scale.dtype != scale_dtype(spec):
        raise QuantizationError(f"{name}: scale must be {want} {scale_dtype(spec)}, found "
                                f"{tuple(scale.shape)} {scale.dtype}")
    codes = quantize_codes(xg, scale, zero_point, spec).reshape(as_2d(w).shape)
    return QuantizedWeight(pack(codes, spec.bits), scale.detach(), zero_point, spec, tuple(w.shape))
