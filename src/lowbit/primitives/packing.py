"""Bit packing of unsigned codes along the last dimension of a 2-D ``(rows, cols)`` tensor.

This is lowbit's one file layout for codes (``PACKING_VERSION``); runtime kernels convert from it.
Each row is packed on its own, so a row (an embedding, an output channel) is a contiguous byte
range. A row whose ``cols * bits`` is not a multiple of the unit is padded with zero codes.
Codes are little-endian: the first element lands in the lowest bits.

8 bits: one code per byte, ``byte[i] = c[i]``.

4 bits: two codes per byte, ``c[2i]`` in the low nibble::

    byte i:   bit 7 6 5 4 | 3 2 1 0
                  c[2i+1] | c[2i]

2 bits: four codes per byte::

    byte i:   bit 7 6 | 5 4 | 3 2 | 1 0
               c[4i+3] c[4i+2] c[4i+1] c[4i]

3 bits: eight codes in three bytes, read as one 24-bit little-endian word ``w``
(``w = byte[3i] | byte[3i+1] << 8 | byte[3i+2] << 16``), code ``c[8i+j]`` in bits ``3j .. 3j+2``::

    byte 3i:   c2[1:0] c1[2:0] c0[2:0]        (c2's low two bits on top)
    byte 3i+1: c5[0]   c4[2:0] c3[2:0] c2[2]
    byte 3i+2: c7[2:0] c6[2:0] c5[2:1]
"""
from __future__ import annotations

import torch

from ..errors import PackingError

PACKING_VERSION = 1
# bits -> (codes per unit, bytes per unit)
_UNITS = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}




def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of ``cols`` codes."""
    per, nbytes = _unit(bits)
    return -(-cols // per) * nbytes


def _unit(bits: int) -> tuple[int, int]:
    if bits in _UNITS:
        return _UNITS[bits]
    if 5 <= bits <= 7:
        return _UNITS[8]  # 5..7-bit codes are stored one per byte
    raise PackingError(f"no packing for {bits} bits; supported: 2..8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (rows, cols), each < 2**bits -> uint8 (rows, packed_cols(cols, bits))."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise PackingError(f"pack expects a 2-D uint8 tensor, found {codes.dim()}-D {codes.dtype}")
    per, nbytes = _unit(bits)
    if codes.numel() and int(codes.max()) >> bits:
        raise PackingError(f"code {int(codes.max())} does not fit in {bits} bits")
    rows, cols = codes.shape
    pad = (-cols) % per
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.int32).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * (bits if per > 1 else 0)
    word = (c << shifts).sum(dim=-1, dtype=torch.int32)  # (rows, units): OR of disjoint bit fields
    byte_shifts = torch.arange(nbytes, dtype=torch.int32) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (rows, units, nbytes)
    return out.reshape(rows, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (rows, packed_cols) -> uint8 codes (rows, cols)."""
    per, nbytes = _unit(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise PackingError(f"unpack expects a 2-D uint8 tensor, found {packed.dim()}-D {packed.dtype}")
    if packed.shape[1] != packed_cols(cols, bits):
        raise PackingError(f"{bits}-bit rows of {cols} codes take {packed_cols(cols, bits)} bytes, "
                           f"found {packed.shape[1]}")
    rows = packed.shape[0]
    b = packed.to(torch.int32).reshape(rows, -1, nbytes)
    word = (b << (torch.arange(nbytes, dtype=torch.int32) * 8)).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * (bits if per > 1 else 0)
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, units, per)
    return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)
