"""bf16 path for weight-only Linear layers: dequantize 4/8-bit codes to bfloat16, bf16 GEMM.

Worth it only on CPUs whose bf16 GEMM is fast: on an AMD EPYC (Zen 4, AVX512_BF16) with torch 2.13
a bf16 ``F.linear`` takes 0.35-0.47x of fp32's time from 32 to 2,048 rows, while on an Intel Xeon
without AMX it took 1.8x (issue 6); `kernels.select` times it on the host before using it.

The weight is ``bf16(q * scale + offset)``: each row block is dequantized into an fp32 scratch by
`cpu.dequant_rows_into` (the fp32 path's own arithmetic) and rounded once to bf16, so the weight
equals ``cpu.dequant_f32(...).to(bfloat16)`` bit for bit (and the reference's
``QuantizedWeight.dequantize(float32).to(bfloat16)`` whenever the fp32 path equals it, i.e. with
float16 scales). Blocks of about ``CHUNK_ELEMENTS`` keep the scratch in cache on large weights
(4096 x 4096: ~2x faster than one fp32 tensor then a cast, measured here). Activations are cast to
bf16; the GEMM's output is bf16, widened to fp32, then the fp32 bias is added.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QuantizedWeight
from .cpu import dequant_rows_into
from .layout import Codes, codes_of, row_align

CHUNK_ELEMENTS = 1 << 20  # fp32 scratch of 4 MiB


def bf16_supported(qw: QuantizedWeight) -> bool:
    """4- or 8-bit codes of a 2-D weight, one scale per row or per group, whole bytes per row."""
    s = qw.spec
    return (s.bits in (4, 8) and len(qw.shape) == 2 and s.granularity != "tensor"
            and (s.bits == 8 or qw.shape[1] % 2 == 0))


def dequant_bf16(qw: QuantizedWeight | Codes, scale: torch.Tensor,
                 offset: torch.Tensor | None) -> torch.Tensor:
    """(out, in) bf16 weight from 4/8-bit codes in any `kernels.layout` layout and
    `cpu.f32_params`' scale and offset."""
    codes = codes_of(qw)
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    align = row_align(codes)
    block = max(align, min(rows, CHUNK_ELEMENTS // max(cols, 1)) // align * align)
    scratch = torch.empty(min(block, rows), cols, dtype=torch.float32)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        part = dequant_rows_into(scratch[: r1 - r0], codes, r0, scale[r0:r1],
                                 None if offset is None else offset[r0:r1])
        out[r0:r1].copy_(part)
    return out


def bf16_linear(x2d: torch.Tensor, qw: QuantizedWeight | Codes, scale: torch.Tensor,
                offset: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (M, N): bf16 activations times the bf16 dequantized weight, fp32 bias added after."""
    out = F.linear(x2d.to(torch.bfloat16), dequant_bf16(qw, scale, offset)).float()
    return out if bias is None else out.add_(bias.float())


def ref_bf16_linear(x2d: torch.Tensor, qw: QuantizedWeight,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference twin: `primitives` dequantization in fp32, rounded to bf16, the same bf16 GEMM."""
    w = qw.dequantize(torch.float32).reshape(qw.shape[0], -1).to(torch.bfloat16)
    out = F.linear(x2d.to(torch.bfloat16), w).float()
    return out if bias is None else out.add_(bias.float())
