"""int8 x int8 -> int32 Linear on the CPU: dynamic (per-token) and static (per-tensor) activations.

Weights: lowbit's 8-bit symmetric per-channel codes ``q_w`` (uint8, implicit zero point 128) become
signed ``w = q_w - 128`` (int8, (N, K)) with one float32 scale ``s_w`` per output channel.
Activations: uint8 codes ``q_x`` with a float zero point ``z_x`` and scale ``s_x`` from
`primitives` (per token: `primitives.tokens`; static: given by calibration), so with the exact
int32 product ``acc = q_x @ w.T`` (``torch._int_mm``, uint8 x int8) and the per-channel column sums
``c = sum_k w[n, k]`` computed once::

    y[m, n] = s_x[m] * s_w[n] * (acc[m, n] - z_x[m] * c[n]) + bias[n]

the zero point is corrected in the epilogue (as in Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, eq. 7; per-token
activation scales as in Yao et al., "ZeroQuant", NeurIPS 2022).

Speed notes (AMD EPYC, torch 2.13, 1 thread; measured while writing this): the weight is handed to
``_int_mm`` as the transposed view of a contiguous (N, K) tensor (issue 6: about 6x faster at M=1
than a contiguous (K, N)); mixed-dtype elementwise ops (int32 * float32) are 5-20x slower than casting
once and working in float32 in place, so the epilogue casts ``acc`` once and then updates it in
place; per-row ``amin`` + ``amax`` beat ``aminmax`` 10x. Fused alternatives checked in torch
2.13: ``onednn::qlinear_pointwise`` takes plain tensors but only one activation scale and zero
point per tensor ("act scale/zp size should be 1"), ``aten::_scaled_mm`` on the CPU takes only
float8; a ``torch.compile``d quantize and epilogue was ~15-25% faster at 2,048 rows but compiled
for 30 s, so it is not used. ``ref_w8a8_linear`` and ``ref_w8a8_static_linear`` are the
plain-torch twins (exact integer products in float64).
"""
from __future__ import annotations

import numpy as np
import torch

from ..primitives.affine import (MIN_RELATIVE_SCALE, SMALLEST_SCALE, params_from_range,
                                 quantize_codes, round_to_codes)
from ..primitives.tokens import ACT_SPEC, token_params, token_range
from . import jit

# the compiled kernels' constants, from `primitives` (float32, as the twins compute)
_TOKEN_CONSTANTS = (np.float32(ACT_SPEC.qmax), np.float32(MIN_RELATIVE_SCALE),
                    np.float32(SMALLEST_SCALE["float32"]))
QUANT_BLOCK = 1 << 19  # most elements of activations quantized in one piece
INPLACE_CAST_MIN = 1 << 16  # int32 products at least this large are cast to float in place


def prepare_w8a8(codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kernel tensors from 8-bit symmetric per-channel codes (N, K) uint8 and scales (N, 1).

    ``weight`` int8 (N, K) contiguous, ``scale`` float32 (N,), ``col_sum`` float32 (N,) (exact:
    |sum| <= 128 * K < 2**24 for K < 131072).
    """
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"w8a8 weight codes: expected a 2-D uint8 tensor (N, K), found "
                         f"{tuple(codes.shape)} {codes.dtype}")
    if tuple(scale.shape) not in ((codes.shape[0], 1), (codes.shape[0],)):
        raise ValueError(f"w8a8 weight scale: expected ({codes.shape[0]}, 1) for {codes.shape[0]} "
                         f"output channels, found {tuple(scale.shape)}")
    w = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()  # (N, K)
    col_sum = w.sum(dim=1, dtype=torch.int32).float()  # (N,)
    return {"weight": w, "scale": scale.float().reshape(-1).contiguous(), "col_sum": col_sum}


def codes_from_prepared(prepared: dict[str, torch.Tensor]) -> torch.Tensor:
    """lowbit's uint8 codes (N, K) back from the kernel's int8 weight, so a layer can hold the
    kernel form alone (one copy of the weights) and still write the file layout."""
    return (prepared["weight"].to(torch.int16) + 128).to(torch.uint8)


def quantize_tokens(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes (M, K) and float32 scale, zero point (M, 1), one grid per row."""
    x = x2d.float()
    scale, zp = token_params(*token_range(x))
    return _by_row_blocks(x, scale, zp, token_codes), scale, zp


def token_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes (M, K) of float32 rows on their *own* min-max grids (`token_params`), equal bit
    for bit to `primitives.affine.quantize_codes` (tests/parity/test_int8_dynamic.py) in 3 passes
    instead of 4: ``x / scale + zp``, then `round_to_codes`, with no clamp. The clamp cannot bite:
    with ``lo <= x <= hi``, ``zp = -lo / scale`` and ``scale >= (hi - lo) / 255``, the exact value
    ``(x - lo) / scale`` lies in [0, 255]; ``scale >= max(|lo|, |hi|) * 2**-9`` keeps ``|x / scale|``
    and ``|zp|`` <= 512, so the two float32 roundings move it by < 2 * 512 * 2**-24 < 0.5 and
    round-to-nearest lands on 0..255. (A NaN row gives NaN, code 0, either way.) Measured on an
    AMD EPYC, 1 thread, 960 x 384: 0.12 ms vs 0.15 ms with the clamp; 960 x 1536: 0.43 vs 0.67."""
    return round_to_codes(torch.div(x, scale).add_(zp), out)


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """uint8 codes (M, K) of float32 ``x`` by `primitives.affine.quantize_codes`, with ``scale``
    and ``zp`` of shape (M, 1) (per row) or (1, 1) (per tensor), values outside the grid clamped."""
    return _by_row_blocks(x, scale, zp, _clamped_codes)


def _clamped_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    q = quantize_codes(x.unsqueeze(1), scale, zp, ACT_SPEC).view(x.shape)  # (M, 1, K) -> (M, K)
    return q if out is None else out.copy_(q)


def _by_row_blocks(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, codes) -> torch.Tensor:
    """``codes(x, scale, zp, out)`` with inputs over `QUANT_BLOCK` elements in row blocks of about
    that size, each written into its rows of one uint8 result, so the float temporaries stay in
    cache (2048 x 1536: ~1.15x faster here than in one piece; no gain below 2**19 elements).
    ``scale``, ``zp``: (M, 1) per row or (1, 1)."""
    rows = max(1, QUANT_BLOCK // max(x.shape[1], 1))
    if x.shape[0] <= rows:
        return codes(x, scale, zp)
    per_row = scale.shape[0] > 1
    q = torch.empty(x.shape, dtype=torch.uint8)
    for r0 in range(0, x.shape[0], rows):
        r1 = min(r0 + rows, x.shape[0])
        s, z = (scale[r0:r1], zp[r0:r1]) if per_row else (scale, zp)
        codes(x[r0:r1], s, z, q[r0:r1])
    return q


def int_mm_float(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The exact int32 product ``q @ weight.T`` (M, N) as float32. Large products are converted in
    their own buffer (a same-size dtype view: no second (M, N) allocation, whose page faults cost
    more than the cast); below `INPLACE_CAST_MIN` elements a fresh ``.float()`` is ~10x faster than
    the overlapping in-place copy (measured on an AMD EPYC, torch 2.13)."""
    acc = torch._int_mm(q, weight.t())
    if acc.numel() < INPLACE_CAST_MIN:
        return acc.float()
    out = acc.view(torch.float32)
    out.copy_(acc)
    return out


def w8a8_linear(x2d: torch.Tensor, prepared: dict[str, torch.Tensor],
                bias: torch.Tensor | None = None,
                inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic w8a8: per-token asymmetric uint8 activations, int8 weights; float32 (M, N).

    ``inv_smooth`` (K,) float32: SmoothQuant's run-time input scaling, ``x / s`` per input channel
    (as ``x * (1 / s)``) before the per-token grids, for a weight quantized as ``W * s``; one more
    pass over the input (each row's range is that of the scaled row, so it cannot be folded).

    The codes and the epilogue run as compiled loops (`kernels.jit`: one pass each instead of 4-5
    torch ops) when they are available, else as `w8a8_linear_torch`, their twin: the same codes bit
    for bit, the same float32 epilogue in the same order."""
    if inv_smooth is not None:
        x2d = x2d * inv_smooth  # (M, K) * (K,)
    n = prepared["weight"].shape[0]
    codes = jit.kernel("token_codes", x2d.numel())
    epilogue = jit.kernel("zp_epilogue", x2d.shape[0] * n)
    if codes is None or epilogue is None:
        return w8a8_linear_torch(x2d, prepared, bias)
    x = x2d.detach().float().contiguous()
    q, s_x, z_x = codes(x.numpy(), *_TOKEN_CONSTANTS)
    acc = torch._int_mm(torch.from_numpy(q), prepared["weight"].t())  # (M, N) int32
    return torch.from_numpy(epilogue(acc.numpy(), s_x, z_x, prepared["col_sum"].numpy(),
                                     prepared["scale"].numpy(), _bias_or_zeros(bias, prepared)))


def _bias_or_zeros(bias: torch.Tensor | None, prepared: dict[str, torch.Tensor]) -> np.ndarray:
    if bias is None:
        return np.zeros(prepared["weight"].shape[0], np.float32)
    return bias.detach().float().contiguous().numpy()


def w8a8_linear_torch(x2d: torch.Tensor, prepared: dict[str, torch.Tensor],
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """`w8a8_linear` in torch ops (the compiled kernels' twin, and what runs without them)."""
    q, s_x, z_x = quantize_tokens(x2d)
    out = int_mm_float(q, prepared["weight"])  # (M, N)
    out.addr_(z_x.view(-1), prepared["col_sum"], alpha=-1)  # acc - z_x * c
    out.mul_(s_x)
    if bias is None:
        return out.mul_(prepared["scale"])
    return torch.addcmul(bias.float(), out, prepared["scale"], out=out)


def static_epilogue(prepared: dict[str, torch.Tensor], act_scale: "float | torch.Tensor",
                    act_zero_point: "float | torch.Tensor",
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mul`` and ``add`` (N,) with ``y = acc * mul + add`` for fixed s_x, z_x."""
    mul = prepared["scale"] * float(act_scale)
    add = mul * (-float(act_zero_point)) * prepared["col_sum"]
    return mul, add if bias is None else add + bias.float()


def quantize_static(x2d: torch.Tensor, act_scale: "float | torch.Tensor",
                    act_zero_point: "float | torch.Tensor") -> torch.Tensor:
    """uint8 codes (M, K) on one grid for the whole tensor (values outside it are clamped). The
    parameters may be floats or one-element float32 tensors (a layer's buffers: no new tensor
    per call)."""
    return quantize_rows(x2d.float(), _as_11(act_scale), _as_11(act_zero_point))


def _as_11(v: "float | torch.Tensor") -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(1, 1).float()
    return torch.tensor([[v]], dtype=torch.float32)


def w8a8_static_linear(x2d: torch.Tensor, prepared: dict[str, torch.Tensor],
                       act_scale: "float | torch.Tensor", act_zero_point: "float | torch.Tensor",
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Static w8a8: one activation scale / zero point (from calibration; floats or one-element
    tensors); float32 (M, N). Codes and epilogue as compiled loops when available (`kernels.jit`),
    else in torch ops (`w8a8_static_linear_torch`, their twin)."""
    check_act_params(act_scale, act_zero_point)
    codes = jit.kernel("grid_codes", x2d.numel())
    epilogue = jit.kernel("grid_epilogue", x2d.shape[0] * prepared["weight"].shape[0])
    if codes is None or epilogue is None:
        return w8a8_static_linear_torch(x2d, prepared, act_scale, act_zero_point, bias)
    x = x2d.detach().float().contiguous()
    scale, zero_point = np.float32(float(act_scale)), np.float32(float(act_zero_point))  # as the twin
    q = codes(x.numpy(), scale, zero_point, _TOKEN_CONSTANTS[0])
    acc = torch._int_mm(torch.from_numpy(q), prepared["weight"].t())  # (M, N) int32
    return torch.from_numpy(epilogue(acc.numpy(), scale, zero_point, prepared["col_sum"].numpy(),
                                     prepared["scale"].numpy(), _bias_or_zeros(bias, prepared)))


def w8a8_static_linear_torch(x2d: torch.Tensor, prepared: dict[str, torch.Tensor],
                             act_scale: "float | torch.Tensor",
                             act_zero_point: "float | torch.Tensor",
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """`w8a8_static_linear` in torch ops."""
    check_act_params(act_scale, act_zero_point)
    q = quantize_static(x2d, act_scale, act_zero_point)
    mul, add = static_epilogue(prepared, act_scale, act_zero_point, bias)
    out = int_mm_float(q, prepared["weight"])  # (M, N)
    return torch.addcmul(add, out, mul, out=out)


def check_act_params(act_scale: float, act_zero_point: float) -> None:
    if not (float(act_scale) > 0 and float(act_scale) != float("inf")):
        raise ValueError(f"w8a8-static: act_scale must be a positive finite float, found {act_scale!r}")
    if not -(1 << 24) <= float(act_zero_point) <= (1 << 24):
        raise ValueError(f"w8a8-static: act_zero_point must be a float in [-2**24, 2**24], found "
                         f"{act_zero_point!r}")


def _exact_acc(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(M, K) uint8 x (N, K) uint8 codes -> (M, N) float64 of ``q @ (codes - 128).T``, exact."""
    return q.double() @ (codes.double() - 128.0).t()


def ref_w8a8_linear(x2d: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Reference twin of `w8a8_linear`: the same codes from `primitives` (`params_from_range` and
    `quantize_codes` on each row), the integer product and the epilogue in float64."""
    x = x2d.float() if inv_smooth is None else x2d.float() * inv_smooth.float()
    s_x, z_x = params_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), ACT_SPEC)
    q = quantize_codes(x.unsqueeze(1), s_x, z_x, ACT_SPEC).view(x.shape)  # (M, K)
    w = codes.double() - 128.0  # (N, K)
    y = (_exact_acc(q, codes) - z_x.double() * w.sum(1)) * s_x.double() * scale.double().reshape(1, -1)
    return (y if bias is None else y + bias.double()).float()


def ref_w8a8_static_linear(x2d: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                           act_scale: float, act_zero_point: float,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference twin of `w8a8_static_linear`: dequantize both sides in float64, multiply."""
    x = x2d.float()
    s = torch.tensor([[act_scale]], dtype=torch.float32)
    z = torch.tensor([[act_zero_point]], dtype=torch.float32)
    q = quantize_codes(x.reshape(1, 1, -1), s, z, ACT_SPEC).view(x.shape)  # (M, K)
    x_hat = (q.double() - z.double()) * s.double()
    w_hat = (codes.double() - 128.0) * scale.double().reshape(-1, 1)
    y = x_hat @ w_hat.t()
    return (y if bias is None else y + bias.double()).float()
