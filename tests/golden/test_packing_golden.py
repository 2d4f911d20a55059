"""Golden bytes for lowbit's code layout (primitives/packing.py, PACKING_VERSION 1) and golden
quantized weights for tiny hand-computed inputs (primitives/affine.py formulas).

Every expected value below was derived by hand from the bit diagrams in the packing docstring and
the formulas in the affine docstring; none is produced by the code under test.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.primitives import (PACKING_VERSION, PackingError, pack, packed_cols, quantize_weight,
                               unpack)
from lowbit.spec import parse_scheme

FP16_TINY = 2.0 ** -24  # smallest subnormal float16: the scale of an all-zero group


def u8(rows):
    return torch.tensor(rows, dtype=torch.uint8)


# (bits, codes (rows of ints), expected packed bytes (rows of ints)) -- derived by hand
GOLDEN_PACKS = [
    # 8 bits: byte[i] = c[i]
    (8, [[0, 1, 127, 128, 255]], [[0, 1, 127, 128, 255]]),
    # 4 bits: c[2i] in the low nibble, c[2i+1] in the high nibble
    (4, [[1, 2, 3, 4]], [[0x21, 0x43]]),
    (4, [[15, 0, 0, 15]], [[0x0F, 0xF0]]),
    (4, [[0xA, 0x5, 0xC, 0x3]], [[0x5A, 0x3C]]),
    # 4 bits, odd count: the last byte's high nibble is a zero pad
    (4, [[1, 2, 3]], [[0x21, 0x03]]),
    (4, [[1, 2, 3], [4, 5, 6]], [[0x21, 0x03], [0x54, 0x06]]),  # rows are packed on their own
    # 2 bits: c[4i] in bits 1..0, c[4i+3] in bits 7..6
    (2, [[0, 1, 2, 3]], [[0b11100100]]),
    (2, [[3, 3, 3, 3, 3, 3, 3, 3]], [[0xFF, 0xFF]]),
    (2, [[3, 0, 0, 0, 1]], [[0b00000011, 0b00000001]]),  # 5 codes: 3 zero pads in byte 1
    (2, [[0, 0, 0, 2]], [[0b10000000]]),
    # 3 bits: 8 codes in a 24-bit little-endian word, code j in bits 3j..3j+2
    #   w = 1<<3 | 2<<6 | 3<<9 | 4<<12 | 5<<15 | 6<<18 | 7<<21
    #   byte0 = 8 + 128 = 136; byte1 = 6 + 64 + 128 = 198; byte2 = 2 + 24 + 224 = 250
    (3, [[0, 1, 2, 3, 4, 5, 6, 7]], [[136, 198, 250]]),
    (3, [[7] * 8], [[255, 255, 255]]),
    (3, [[7, 0, 0, 0, 0, 0, 0, 0]], [[0b00000111, 0, 0]]),
    (3, [[0, 0, 7, 0, 0, 0, 0, 0]], [[0b11000000, 0b00000001, 0]]),  # c2 straddles bytes 0 and 1
    (3, [[0, 0, 0, 0, 0, 7, 0, 0]], [[0, 0b10000000, 0b00000011]]),  # c5 straddles bytes 1 and 2
    (3, [[0, 0, 0, 0, 0, 0, 0, 7]], [[0, 0, 0b11100000]]),
    # 3 bits, partial unit: 1 | 2<<3 | 3<<6 = 209, and two zero pad bytes
    (3, [[1, 2, 3]], [[209, 0, 0]]),
    # 3 bits, 9 codes: a full unit then a padded one
    (3, [[0, 1, 2, 3, 4, 5, 6, 7, 5]], [[136, 198, 250, 5, 0, 0]]),
    # 5..7 bits: one code per byte
    (5, [[31, 0, 17]], [[31, 0, 17]]),
    (6, [[63, 0, 17]], [[63, 0, 17]]),
    (7, [[127, 64, 1]], [[127, 64, 1]]),
]


def test_packing_version():
    assert PACKING_VERSION == 1


@pytest.mark.parametrize("bits,codes,expected", GOLDEN_PACKS,
                         ids=[f"{b}bit-{i}" for i, (b, _, _) in enumerate(GOLDEN_PACKS)])
def test_pack_golden_bytes(bits, codes, expected):
    packed = pack(u8(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected


@pytest.mark.parametrize("bits,codes,expected", GOLDEN_PACKS,
                         ids=[f"{b}bit-{i}" for i, (b, _, _) in enumerate(GOLDEN_PACKS)])
def test_unpack_inverts_golden_bytes(bits, codes, expected):
    cols = len(codes[0])
    assert unpack(u8(expected), bits, cols).tolist() == codes


# (cols, bits) -> bytes per packed row
GOLDEN_PACKED_COLS = {(128, 8): 128, (128, 4): 64, (129, 4): 65, (128, 2): 32, (5, 2): 2,
                      (8, 3): 3, (9, 3): 6, (128, 3): 48, (130, 3): 51, (5, 6): 5, (1, 4): 1}


@pytest.mark.parametrize("cols,bits", sorted(GOLDEN_PACKED_COLS))
def test_packed_cols(cols, bits):
    assert packed_cols(cols, bits) == GOLDEN_PACKED_COLS[(cols, bits)]
    assert pack(torch.zeros(2, cols, dtype=torch.uint8), bits).shape == (2, GOLDEN_PACKED_COLS[(cols, bits)])


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_unsupported_bits_raise(bits):
    with pytest.raises(PackingError, match="2..8"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), bits)
    with pytest.raises(PackingError):
        packed_cols(8, bits)


def test_pack_rejects_wrong_dtype_and_rank():
    with pytest.raises(PackingError, match="uint8"):
        pack(torch.zeros(1, 8, dtype=torch.int32), 4)
    with pytest.raises(PackingError, match="2-D"):
        pack(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(PackingError, match="uint8"):
        unpack(torch.zeros(1, 4, dtype=torch.int8), 4, 8)


def test_unpack_rejects_wrong_byte_count():
    with pytest.raises(PackingError, match="take 4 bytes, found 3"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(PackingError, match="take 3 bytes, found 4"):
        unpack(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(PackingError):
        pack(u8([[16, 0]]), 4)


# ---------------------------------------------------------------------------------------------
# Golden quantized weights
# ---------------------------------------------------------------------------------------------

# w8, symmetric per channel: scale = amax / 127, q = round(x / scale) + 128 clamped to [1, 255].
# torch.round rounds half to even: 1.5 -> 2, 0.5 -> 0, -0.5 -> 0.
W8_INPUT = [
    # amax 31.75 = 127 * 0.25 -> scale 0.25
    [31.75, -31.75, 2.5, 0.0, 0.375, -0.125, 1.0, -2.0],
    # amax 127/128 -> scale 1/128 = 0.0078125
    [0.9921875, 0.5, -0.5, 0.25, 0.0, -0.0078125, 0.0234375, -0.9921875],
    # all zero -> the smallest subnormal float16 scale, every code at the zero point 128
    [0.0] * 8,
]
W8_CODES = [
    [255, 1, 138, 128, 130, 128, 132, 120],  # 0.375/0.25 = 1.5 -> 2; -0.125/0.25 = -0.5 -> 0
    [255, 192, 64, 160, 128, 127, 131, 1],
    [128] * 8,
]
W8_SCALE = [[0.25], [0.0078125], [FP16_TINY]]
W8_DEQUANT = [
    [31.75, -31.75, 2.5, 0.0, 0.5, 0.0, 1.0, -2.0],
    [0.9921875, 0.5, -0.5, 0.25, 0.0, -0.0078125, 0.0234375, -0.9921875],
    [0.0] * 8,
]
W8_NBYTES = 3 * 8 + 3 * 2  # codes + float16 scales


def test_quantize_weight_w8_golden():
    qw = quantize_weight(torch.tensor(W8_INPUT), parse_scheme("w8"), "golden.w8")
    assert qw.shape == (3, 8)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.tolist() == W8_CODES  # 8-bit: bytes = codes
    assert qw.scale.dtype == torch.float16 and qw.scale.tolist() == W8_SCALE
    assert qw.zero_point is None
    assert qw.dequantize().tolist() == W8_DEQUANT
    assert qw.nbytes == W8_NBYTES
    qw.check("golden.w8")


# w4g4-zfloat, asymmetric per group of 4 with lowbit's first (float) zero point:
# scale = (hi - lo) / 15, zero_point = -lo / scale,
# q = round(x / scale + zero_point) clamped to [0, 15]. Scale floor max(|lo|, |hi|) * 2**-9.
W4G4_INPUT = [
    # group (0,0): lo -1.5 hi 6 -> scale 0.5, zp 3 | group (0,1): lo 0.25 hi 4 -> scale 0.25, zp -1
    [-1.5, 0.0, 1.5, 6.0, 0.25, 0.5, 1.0, 4.0],
    # group (1,0): lo -7.5 hi 0 -> scale 0.5, zp 15; -3.75/0.5 + 15 = 7.5 -> 8 (half to even)
    # group (1,1): constant 2.0 -> floor scale 2 * 2**-9 = 2**-8, zp = -2 / 2**-8 = -512
    [-7.5, -3.75, -1.875, 0.0, 2.0, 2.0, 2.0, 2.0],
]
W4G4_CODES = [
    [0, 3, 6, 15, 0, 1, 3, 15],
    [0, 8, 11, 15, 0, 0, 0, 0],  # -1.875/0.5 + 15 = 11.25 -> 11
]
# 4-bit packing: (high nibble << 4) | low nibble, pairs (c0,c1), (c2,c3), ...
W4G4_QDATA = [
    [0x30, 0xF6, 0x10, 0xF3],
    [0x80, 0xFB, 0x00, 0x00],
]
W4G4_SCALE = [[0.5, 0.25], [0.5, 2.0 ** -8]]
W4G4_ZERO_POINT = [[3.0, -1.0], [15.0, -512.0]]
W4G4_DEQUANT = [
    [-1.5, 0.0, 1.5, 6.0, 0.25, 0.5, 1.0, 4.0],
    [-7.5, -3.5, -2.0, 0.0, 2.0, 2.0, 2.0, 2.0],
]
W4G4_NBYTES = 2 * 4 + 2 * 2 * 2 * 2  # packed codes + float16 scales + float16 zero points


def test_quantize_weight_w4g4_golden():
    qw = quantize_weight(torch.tensor(W4G4_INPUT), parse_scheme("w4g4-zfloat"), "golden.w4g4")
    assert qw.codes().tolist() == W4G4_CODES
    assert qw.qdata.tolist() == W4G4_QDATA
    assert qw.scale.dtype == torch.float16 and qw.scale.tolist() == W4G4_SCALE
    assert qw.zero_point.dtype == torch.float16 and qw.zero_point.tolist() == W4G4_ZERO_POINT
    assert qw.dequantize().tolist() == W4G4_DEQUANT
    assert qw.nbytes == W4G4_NBYTES
    qw.check("golden.w4g4")


# w4g4 with the default integer zero point: lo, hi = min(lo, 0), max(hi, 0); scale = (hi - lo) / 15;
# zero_point = clamp(round(-lo / scale), 0, 15) stored uint8; q = round(x / scale + zero_point)
# clamped to [0, 15]; torch.round is half to even.
W4G4_INT_INPUT = [
    # (0,0): lo -1.5 hi 6 -> scale 0.5, zp 3 | (0,1): all positive, lo 0 hi 7.5 -> scale 0.5, zp 0;
    # 0.75 / 0.5 = 1.5 -> 2 (half to even)
    [-1.5, 0.0, 1.5, 6.0, 0.75, 1.5, 3.0, 7.5],
    # (1,0): lo -1.25 hi 6.25 -> scale 0.5, -lo/scale = 2.5 -> zp 2 (half to even): the grid moves
    # up by half a step: -1.25 -> -0.5 -> code 0 (dq -1.0); 6.25 -> 14.5 -> 14 (dq 6.0)
    # (1,1): all negative, lo -7.5 hi 0 -> scale 0.5, zp 15; -3.75 -> 7.5 -> 8; -1.875 -> 11.25 -> 11
    [-1.25, 0.0, 2.0, 6.25, -7.5, -3.75, -1.875, -0.5],
    # (2,0): all zero -> smallest float16 scale 2**-24, zp 0 | (2,1): constant 7.5 -> scale 0.5, zp 0
    [0.0, 0.0, 0.0, 0.0, 7.5, 7.5, 7.5, 7.5],
]
W4G4_INT_CODES = [
    [0, 3, 6, 15, 2, 3, 6, 15],
    [0, 2, 6, 14, 0, 8, 11, 14],
    [0, 0, 0, 0, 15, 15, 15, 15],
]
W4G4_INT_QDATA = [[0x30, 0xF6, 0x32, 0xF6], [0x20, 0xE6, 0x80, 0xEB], [0x00, 0x00, 0xFF, 0xFF]]
W4G4_INT_SCALE = [[0.5, 0.5], [0.5, 0.5], [2.0 ** -24, 0.5]]
W4G4_INT_ZERO_POINT = [[3, 0], [2, 15], [0, 0]]
W4G4_INT_DEQUANT = [
    [-1.5, 0.0, 1.5, 6.0, 1.0, 1.5, 3.0, 7.5],
    [-1.0, 0.0, 2.0, 6.0, -7.5, -3.5, -2.0, -0.5],
    [0.0, 0.0, 0.0, 0.0, 7.5, 7.5, 7.5, 7.5],
]
W4G4_INT_NBYTES = 3 * 4 + 3 * 2 * 2 + 3 * 2 * 1  # packed codes + float16 scales + uint8 zero points


def test_quantize_weight_w4g4_int_zero_point_golden():
    qw = quantize_weight(torch.tensor(W4G4_INT_INPUT), parse_scheme("w4g4"), "golden.w4g4")
    assert qw.codes().tolist() == W4G4_INT_CODES
    assert qw.qdata.tolist() == W4G4_INT_QDATA
    assert qw.scale.dtype == torch.float16 and qw.scale.tolist() == W4G4_INT_SCALE
    assert qw.zero_point.dtype == torch.uint8 and qw.zero_point.tolist() == W4G4_INT_ZERO_POINT
    assert qw.dequantize().tolist() == W4G4_INT_DEQUANT
    assert qw.nbytes == W4G4_INT_NBYTES
    qw.check("golden.w4g4")


# w2t, asymmetric per tensor: lo -1 hi 2 -> scale 1, zp 1; codes round(x + 1) clamped to [0, 3]
W2T_INPUT = [[-1.0, 0.0, 1.0, 2.0, 0.5], [1.5, -0.5, 2.0, -1.0, 0.25]]
W2T_CODES = [[0, 1, 2, 3, 2], [2, 0, 3, 0, 1]]  # 1.5 -> 2, 2.5 -> 2, 0.5 -> 0 (half to even)
W2T_QDATA = [[0b11100100, 0b00000010], [0b00110010, 0b00000001]]


def test_quantize_weight_w2t_golden():
    qw = quantize_weight(torch.tensor(W2T_INPUT), parse_scheme("w2t"), "golden.w2t")
    assert qw.scale.tolist() == [[1.0]] and qw.zero_point.tolist() == [[1.0]]
    assert qw.codes().tolist() == W2T_CODES
    assert qw.qdata.tolist() == W2T_QDATA


# w3g8, symmetric per group of 8: scale = amax / 3, codes round(x / scale) + 4 in [1, 7]
W3G8_INPUT = [[-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.125]]  # amax 0.75 -> scale 0.25
W3G8_CODES = [[1, 2, 3, 4, 5, 6, 7, 4]]  # 0.125/0.25 = 0.5 -> 0 -> code 4
# w = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 4<<21 = 0x9F58D1
W3G8_QDATA = [[0xD1, 0x58, 0x9F]]


def test_quantize_weight_w3g8_sym_golden():
    qw = quantize_weight(torch.tensor(W3G8_INPUT), parse_scheme("w3g8-sym"), "golden.w3g8")
    assert qw.scale.tolist() == [[0.25]] and qw.zero_point is None
    assert qw.codes().tolist() == W3G8_CODES
    assert qw.qdata.tolist() == W3G8_QDATA
