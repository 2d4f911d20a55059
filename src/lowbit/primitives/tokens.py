"""Per-token (per-row) parameters for int8 activations quantized at run time (dynamic ``w8a8``).

Each row of a 2-D activation ``(tokens, features)`` gets its own asymmetric 8-bit grid over its
min-max range, exactly as `affine.params_from_range` builds one for an asymmetric 8-bit spec with
float32 scales (`ACT_SPEC`); this is a lean twin of it (fewer small ops: it runs on every forward),
and `tests/parity/test_int8_dynamic.py` checks the two agree bit for bit. Codes then come from
`affine.quantize_codes`, the one rounding in lowbit:

    scale = max((hi - lo) / 255, max(|lo|, |hi|) * MIN_RELATIVE_SCALE, tiny)      (tokens, 1)
    zero_point = -lo / scale           a float, as every asymmetric lowbit zero point (tokens, 1)
    q = clamp(round(x / scale + zero_point), 0, 255)                               uint8
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .affine import MIN_RELATIVE_SCALE, SMALLEST_SCALE, params_from_range

ACT_SPEC = QuantSpec(bits=8, symmetric=False, granularity="channel", scale_dtype="float32",
                     zero_point_form="float")


def token_range(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max (tokens, 1). Two reductions: ``torch.aminmax`` over rows was 10-17x
    slower than ``amin`` + ``amax`` on an AMD EPYC with torch 2.13 (2048 x 384 and 2048 x 1536)."""
    return x2d.amin(1, keepdim=True), x2d.amax(1, keepdim=True)


def token_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale and zero point (tokens, 1) for rows with ranges ``lo <= hi``; equal to
    ``affine.params_from_range(lo, hi, ACT_SPEC)`` bit for bit (``hi + (-lo)`` is ``hi - lo``,
    ``max(|lo|, |hi|)`` is ``max(hi, -lo)`` when ``lo <= hi``, and taking the smallest scale
    into the floor first changes no maximum): 8 small ops, as it runs on every forward."""
    neg_lo = lo.neg()
    floor = torch.maximum(hi, neg_lo).mul_(MIN_RELATIVE_SCALE).clamp_(min=SMALLEST_SCALE["float32"])
    scale = torch.maximum((hi + neg_lo).div_(ACT_SPEC.qmax), floor)
    return scale, neg_lo.div_(scale)


# Static inputs (w8a8-static): one asymmetric 8-bit grid for the whole tensor, from a calibrated
# range; the zero point is an integer code, so 0.0 (zero padding, ReLU zeros) is exact.
STATIC_ACT_SPEC = QuantSpec(bits=8, symmetric=False, granularity="tensor", scale_dtype="float32")


def static_input_params(lo: "torch.Tensor | float", hi: "torch.Tensor | float") -> dict[str, float]:
    """``{"scale", "zero_point"}`` (plain floats: they travel in a file header as JSON) for a
    calibrated input range, by `affine.params_from_range` under `STATIC_ACT_SPEC`."""
    lo_t = torch.as_tensor(lo, dtype=torch.float32).amin().reshape(1, 1)
    hi_t = torch.as_tensor(hi, dtype=torch.float32).amax().reshape(1, 1)
    scale, zero_point = params_from_range(lo_t, hi_t, STATIC_ACT_SPEC)
    return {"scale": float(scale), "zero_point": float(zero_point)}
