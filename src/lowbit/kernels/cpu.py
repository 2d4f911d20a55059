"""Fast CPU twins of `primitives` for weight-only Linear layers, and their plain-torch references.

Measured on this CPU (torch 2.13, AVX-512): the aten int4/int8 weight-packed matmuls are fast only
with **bfloat16** activations (with float32 activations they are 4-50x slower than fp32), so the
fast paths cast activations to bf16 and the output back. Which path a layer uses depends on the
number of activation rows ``M`` (see `choose_path`); every path has a reference twin that
dequantizes with `primitives` and is parity-tested (tests/parity).

Paths:
  ``int4mm``   aten._weight_int4pack_mm_for_cpu (4-bit, group 32/64/128/256), bf16 activations
  ``int8mm``   aten._weight_int8pack_mm (8-bit symmetric per channel), bf16 activations
  ``bf16``     unpack + dequantize to bf16 each call, then a bf16 matmul (large M)
  ``ref``      dequantize to fp32 with `primitives`, fp32 matmul: 2/3/5/6/7-bit and anything else
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QuantizedWeight
from ..primitives.affine import implicit_zero_point

INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above these many activation rows a bf16 matmul on the freshly dequantized weight beats the
# packed kernels here (benchmarks/weight_only.py; BENCHMARKS.md).
INT4_MAX_ROWS = 64
INT8_MAX_ROWS = 64


def int4_supported(qw: QuantizedWeight) -> bool:
    s = qw.spec
    return (s.bits == 4 and s.granularity == "group" and s.group_size in INT4_GROUP_SIZES
            and len(qw.shape) == 2 and qw.shape[0] % 16 == 0 and qw.shape[1] % s.group_size == 0)


def int8_supported(qw: QuantizedWeight) -> bool:
    s = qw.spec
    return s.bits == 8 and s.symmetric and s.granularity == "channel" and len(qw.shape) == 2


def choose_path(qw: QuantizedWeight, rows: int) -> str:
    """The path for ``rows`` activation rows (the product of all but the last input dim)."""
    if int4_supported(qw):
        return "int4mm" if rows <= INT4_MAX_ROWS else "bf16"
    if int8_supported(qw):
        return "int8mm" if rows <= INT8_MAX_ROWS else "bf16"
    return "ref"


def bf16_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (rows, n_groups) in bf16 with ``w = q * scale + offset``."""
    zp = float(implicit_zero_point(qw.spec)) if qw.zero_point is None else qw.zero_point.float()
    scale = qw.scale.float()
    return scale.to(torch.bfloat16), (-zp * scale).to(torch.bfloat16)


def unpack_fast(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes for 4- and 8-bit rows with no padding; twin of `primitives.unpack`."""
    if bits == 8:
        return qdata
    low, high = qdata & 0x0F, qdata >> 4
    return torch.stack((low, high), dim=-1).reshape(qdata.shape[0], -1)


def dequant_bf16(qw: QuantizedWeight, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(out, in) bf16 weight from packed codes; twin of `QuantizedWeight.dequantize`."""
    rows, cols = qw.shape
    groups = scale.shape[1] if scale.shape[0] == rows else 1
    q = unpack_fast(qw.qdata, qw.spec.bits).to(torch.bfloat16).view(rows, groups, -1)
    return torch.addcmul(offset.unsqueeze(-1), q, scale.unsqueeze(-1)).view(rows, cols)


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
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16), packed, group_size, sz)


def int8_linear(x2d: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16), w, scales)


def bf16_linear(x2d: torch.Tensor, qw: QuantizedWeight, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return F.linear(x2d.to(torch.bfloat16), dequant_bf16(qw, scale, offset))


def ref_linear(x2d: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The reference: fp32 dequantization by `primitives`, fp32 matmul."""
    return F.linear(x2d.float(), qw.dequantize(torch.float32).reshape(qw.shape[0], -1))
