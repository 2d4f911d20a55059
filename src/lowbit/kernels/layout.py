"""The layouts a weight-only layer may keep its codes in, and the exact conversions between them.

One copy of the codes (issue 6): a layer holds its codes once, in the layout its fastest kernel
reads (`QLinear.kept_layout`); saving derives the file layout from it, and the paths that read the
other layout (``bf16``, ``f32``) write the codes straight from the kept one into their float
scratch (`write_codes`), so no second copy of the codes lives between calls.

Layouts of an (N, K) weight of b-bit codes ``q`` (LAYOUT_VERSION 1)::

  file      uint8 (N, K*b/8), `primitives.packing`; 4-bit: byte[n, i] = q[n, 2i] | q[n, 2i+1] << 4
  int4pack  uint8 (N, K/2), what torch 2.13's ``aten._convert_weight_to_int4pack_for_cpu`` makes
            on x86 (AVX-512 / AVX2 kernels). Rows go in blocks of 64; a full block ``b`` is the
            bytes [b*32K, (b+1)*32K) seen as (K, 32):
                byte[k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4        (j < 32)
            a last block of t < 64 rows (r0 = N - t) is the remaining bytes seen as (K, t/2):
                byte[k, d] = q[r0 + 2d, k] | q[r0 + 2d + 1, k] << 4
  int8      int8 (N, K) = q - 128: 8-bit symmetric codes as ``aten._weight_int8pack_mm`` and
            ``torch._int_mm`` read them (exact both ways: q = int8 + 128)

The int4pack permutation was read off torch's output, not from a documented contract, so
`keep_int4pack` checks the inverse on every weight it packs (one unpack at load time) and the layer
keeps the file layout (and a second, packed copy) if a torch build ever packs differently.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

LAYOUT_VERSION = 1
LAYOUTS = ("file", "int4pack", "int8")
INT4_BLOCK = 64  # rows per full block of the int4 pack


class Codes(NamedTuple):
    """Codes of a 2-D weight in one of `LAYOUTS`: ``data`` as stored, ``shape`` (N, K)."""
    data: torch.Tensor
    layout: str
    bits: int
    shape: tuple[int, int]


def codes_of(w) -> Codes:
    """`Codes` as given, or the file-layout codes of a 2-D `QuantizedWeight`."""
    if isinstance(w, Codes):
        return w
    return Codes(w.qdata, "file", w.spec.bits, (w.shape[0], w.shape[1]))


def row_align(codes: Codes) -> int:
    """Row blocks handed to `write_codes` must start at a multiple of this."""
    return INT4_BLOCK if codes.layout == "int4pack" else 1


def write_codes(out: torch.Tensor, codes: Codes, r0: int, signed: bool = False) -> torch.Tensor:
    """Write the code values of rows [r0, r0 + out.shape[0]) as floats into ``out`` (rows, K);
    ``signed`` (int8 layout only): ``q - 128`` instead, as stored.

    ``r0`` is a multiple of `row_align`; the rows end at a block boundary or at N."""
    rows, cols = out.shape
    data = codes.data
    if codes.layout == "int8":  # q = w + 128: flipping the sign bit of w's byte gives q's byte
        part = data[r0:r0 + rows]
        return out.copy_(part if signed else part.view(torch.uint8) ^ 0x80)
    if codes.layout == "file":
        if codes.bits == 8:
            return out.copy_(data[r0:r0 + rows])
        pairs = out.view(rows, cols // 2, 2)  # (rows, K/2, 2): the two nibbles of each byte
        pairs[..., 0].copy_(data[r0:r0 + rows] & 0x0F)
        pairs[..., 1].copy_(data[r0:r0 + rows] >> 4)
        return out
    _write_int4pack(out, data.view(-1), codes.shape, r0)
    return out


def _write_int4pack(out: torch.Tensor, flat: torch.Tensor, shape: tuple[int, int], r0: int) -> None:
    """The bytes are transposed to row order as uint8 first, then split into nibbles by
    contiguous passes: as fast here as the file layout's two strided copies (a transposing
    uint8 -> float copy was 1.3-1.9x slower)."""
    n, k = shape
    rows = out.shape[0]
    full_end = (n // INT4_BLOCK) * INT4_BLOCK
    r1 = min(r0 + rows, full_end)
    half = INT4_BLOCK // 2
    if r1 > r0:
        blocks = flat[r0 * k // 2:r1 * k // 2].view(-1, k, half)  # (blocks, K, 32)
        rowwise = blocks.transpose(1, 2).contiguous()  # (blocks, 32, K)
        dst = out[:r1 - r0].view(-1, INT4_BLOCK, k)  # (blocks, 64, K)
        dst[:, :half].copy_(rowwise & 0x0F)
        dst[:, half:].copy_(rowwise >> 4)
    if r0 + rows > full_end:
        tail = flat[full_end * k // 2:].view(k, -1).t().contiguous()  # (K, t/2) -> (t/2, K)
        dst = out[full_end - r0:].view(-1, 2, k)  # (t/2, 2, K): row pairs
        dst[:, 0].copy_(tail & 0x0F)
        dst[:, 1].copy_(tail >> 4)


def file_from_int4pack(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The file layout (uint8 (N, K/2)) of an int4 pack: the exact inverse of the pack."""
    n, k = shape
    q = torch.empty(n, k, dtype=torch.uint8)
    _write_int4pack(q, packed.reshape(-1), shape, 0)
    pairs = q.view(n, k // 2, 2)  # (N, K/2, 2) -> file bytes
    return pairs[..., 0] | (pairs[..., 1] << 4)


def int4pack_from_file(qdata: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """torch's int4 pack (uint8 (N, K/2)) of file-layout 4-bit codes."""
    n, k = shape
    q = torch.stack((qdata & 0x0F, qdata >> 4), dim=-1).reshape(n, k).to(torch.int32)  # (N, K)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def int8_from_file(qdata: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) = q - 128 from 8-bit file codes."""
    return (qdata.to(torch.int16) - 128).to(torch.int8).contiguous()


def file_from_int8(w: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) = w + 128 (the sign bit of each byte flipped): the exact inverse of
    `int8_from_file`."""
    return w.view(torch.uint8) ^ 0x80


def to_file(codes: Codes, file_shape: tuple[int, int]) -> torch.Tensor:
    """The file-layout qdata of ``codes`` (a new tensor unless already in the file layout); on the
    meta device an empty meta tensor of the file's shape."""
    if codes.layout == "file":
        return codes.data
    if codes.data.is_meta:
        return torch.empty(file_shape, dtype=torch.uint8, device="meta")
    if codes.layout == "int8":
        return file_from_int8(codes.data)
    return file_from_int4pack(codes.data, codes.shape)


def keep_int4pack(packed: torch.Tensor, qdata: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether ``packed`` maps back to ``qdata`` exactly (so the pack alone may be kept)."""
    return torch.equal(file_from_int4pack(packed, shape), qdata)
