"""Fast CPU twins of `primitives` for weight-only Linear layers, and their plain-torch references.

The aten int4/int8 weight-packed matmuls are fast only with **bfloat16** activations (with
float32 activations 4-50x slower than fp32), so those paths cast activations to bf16 and the
output back; they win at few rows. Which path serves a layer for M rows is not decided here: it
depends on the CPU (a bf16 GEMM took 1.8x fp32's time on an Intel Xeon without AMX and 0.4-0.55x on
an AMD EPYC), so `nn.selection` times the layer's `available_paths` on the host through
`kernels.select` and caches the choice per CPU, torch build and thread count.

Paths:
  ``int4mm``  aten._weight_int4pack_mm_for_cpu (4-bit, group 32/64/128/256), bf16 activations
  ``int8mm``  aten._weight_int8pack_mm (8-bit symmetric per channel), bf16 activations
  ``bf16``    4/8-bit codes dequantized to bf16, bf16 GEMM (`kernels.bf16`)
  ``f32``     4/8-bit codes written straight into an fp32 weight, scaled in place, fp32 matmul
  ``ref``     dequantize with `primitives` (the reference twin), fp32 matmul: 2/3/5/6/7-bit
Each fast path is parity-tested against its reference (tests/parity). ``bf16`` and ``f32`` take
the codes in any `kernels.layout` layout (a layer keeps one copy, in its packed kernel's layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QuantizedWeight
from ..primitives.affine import implicit_zero_point
from ..spec import QuantSpec
from .layout import Codes, codes_of, write_codes

INT4_GROUP_SIZES = (32, 64, 128, 256)
PATHS = ("int4mm", "int8mm", "bf16", "f32", "ref")


def int4_supported(qw: QuantizedWeight) -> bool:
    s = qw.spec
    return (s.bits == 4 and s.granularity == "group" and s.group_size in INT4_GROUP_SIZES
            and len(qw.shape) == 2 and qw.shape[0] % 16 == 0 and qw.shape[1] % s.group_size == 0)


def int8_supported(qw: QuantizedWeight) -> bool:
    """aten._weight_int8pack_mm returns garbage (M=1) or crashes (M>1) when in_features % 16 != 0
    in torch 2.13 (found while benchmarking), so lowbit only hands it multiples of 16."""
    s = qw.spec
    return (s.bits == 8 and s.symmetric and s.granularity == "channel" and len(qw.shape) == 2
            and qw.shape[1] % 16 == 0)


def kernel_kind(qw: QuantizedWeight) -> str | None:
    """Which packed kernel a weight can use: "int4", "int8" or None."""
    return "int4" if int4_supported(qw) else "int8" if int8_supported(qw) else None


def path_supported(qw: QuantizedWeight, path: str) -> bool:
    from .bf16 import bf16_supported
    packed = int4_supported(qw) or int8_supported(qw)
    return {"int4mm": int4_supported(qw), "int8mm": int8_supported(qw), "bf16": bf16_supported(qw),
            "f32": packed, "ref": True}[path]


def available_paths(qw: QuantizedWeight) -> tuple[str, ...]:
    """The weight-only paths a layer can take, in `PATHS` order; ``ref`` only when no faster one
    exists (it is the twin the others are tested against, not a contender)."""
    fast = tuple(p for p in PATHS[:-1] if path_supported(qw, p))
    return fast or ("ref",)


def f32_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (rows, n_groups) in fp32 with ``w = q * scale + offset``; a zero point is
    uint8 codes (the "int" form) or floats (the "float" form), both read as fp32."""
    return f32_params_of(qw.scale, qw.zero_point, qw.spec)


def f32_params_of(scale: torch.Tensor, zero_point: torch.Tensor | None,
                  spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`f32_params` from the weight's parameters alone (a layer's codes may be in another layout)."""
    zp = float(implicit_zero_point(spec)) if zero_point is None else zero_point.float()
    scale = scale.float()
    return scale, -zp * scale


def unpack_fast(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes for 4- and 8-bit rows with no padding; twin of `primitives.unpack`."""
    if bits == 8:
        return qdata
    low, high = qdata & 0x0F, qdata >> 4
    return torch.stack((low, high), dim=-1).reshape(qdata.shape[0], -1)


def dequant_f32(qw: QuantizedWeight | Codes, scale: torch.Tensor,
                offset: torch.Tensor | None) -> torch.Tensor:
    """(out, in) fp32 weight from 4/8-bit codes in any `kernels.layout` layout (a
    `QuantizedWeight`: the file layout); twin of `QuantizedWeight.dequantize`.

    The codes are written straight into the fp32 result (`layout.write_codes`: for a file-layout
    4-bit byte, its two nibbles through two strided copies), then scaled and offset in place: about
    2.5x faster here than unpacking to a uint8 tensor and letting a promoting multiply-add
    allocate the floats.
    """
    codes = codes_of(qw)
    out = torch.empty(codes.shape, dtype=torch.float32)
    return dequant_rows_into(out, codes, 0, scale, offset)


def dequant_rows_into(out: torch.Tensor, codes: Codes, r0: int, scale: torch.Tensor,
                      offset: torch.Tensor | None) -> torch.Tensor:
    """Write ``q * scale + offset`` for rows [r0, r0 + out.shape[0]) of ``codes`` into fp32 ``out``
    (rows, cols); ``scale`` and ``offset`` are those rows' (rows, n_groups); ``r0`` a multiple of
    `layout.row_align`. ``offset`` None (int8 layout, see `offset_free`): ``(q - 128) * scale``."""
    rows, cols = out.shape
    write_codes(out, codes, r0, signed=offset is None)
    grouped = out.view(rows, scale.shape[1], -1)  # (out, groups, group_len)
    grouped.mul_(scale.unsqueeze(-1))
    if offset is not None:
        grouped.add_(offset.unsqueeze(-1))
    return out


def offset_free(spec: QuantSpec) -> bool:
    """Whether ``(q - 128) * scale`` equals ``q * scale + offset`` bit for bit (8-bit symmetric,
    16-bit float scales): ``q * scale`` (8 x 11 significant bits) and ``-128 * scale`` are exact
    in fp32, and so is their sum ``(q - 128) * scale``, so the fp32 path's rounding is none at
    all. The int8 layout then skips the ``+ 128`` and the offset pass."""
    return spec.bits == 8 and spec.symmetric and spec.scale_dtype in ("float16", "bfloat16")


def prepare_int4(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form: packed weight and bf16 scale_and_zeros (n_groups, out, 2).

    The kernel computes ``w = (q - 8) * scale + zero``, so ``zero = (8 - zero_point) * scale``.
    """
    q = unpack_fast(qw.qdata, 4).to(torch.int32)  # (out, in)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scale = qw.scale.float()
    zp = float(implicit_zero_point(qw.spec)) if qw.zero_point is None else qw.zero_point.float()
    zero = (8.0 - zp) * scale
    sz = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def prepare_int8(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form: signed int8 (out, in) = codes - 128, and bf16 per-channel scales (out,)."""
    w = (qw.qdata.to(torch.int16) - 128).to(torch.int8).contiguous()
    return w, qw.scale.float().reshape(-1).to(torch.bfloat16)


def int4_linear(x2d: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """The kernel needs a contiguous 2-D input."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16).contiguous(), packed,
                                                      group_size, sz)


def int8_linear(x2d: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16).contiguous(), w, scales)


def f32_linear(x2d: torch.Tensor, qw: QuantizedWeight | Codes, scale: torch.Tensor,
               offset: torch.Tensor | None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x2d.float(), dequant_f32(qw, scale, offset), bias)


def ref_linear(x2d: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: fp32 dequantization by `primitives`, fp32 matmul."""
    return F.linear(x2d.float(), qw.dequantize(torch.float32).reshape(qw.shape[0], -1), bias)
