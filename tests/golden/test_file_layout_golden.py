"""Golden bytes of a saved file: one Linear(32, 16) with exactly representable weights, quantized
with w4g32 (integer zero point), w4g32-zfloat (float zero point) and w8. Every expected value below
was worked out by hand from the documented formulas (spec.py, primitives/affine.py,
primitives/packing.py, io/format.py), not by running lowbit:

    asymmetric, int (default): lo, hi = min(lo, 0), max(hi, 0); scale = (hi - lo) / qmax,
                zero_point = clamp(round(-lo / scale), 0, qmax), stored uint8
    asymmetric, float (-zfloat): scale = (hi - lo) / qmax, zero_point = -lo / scale, stored float16
    symmetric:  scale = amax / (2**(bits-1) - 1), implicit zero point 2**(bits-1), codes [1, qmax]
    codes:      q = clamp(round(w / scale + zero_point), qmin, qmax), round half to even (torch.round)
    4-bit:      byte j of a row = c[2j] | c[2j+1] << 4;   8-bit: byte j = c[j]

The file is read by hand (8-byte little-endian header length, JSON header, data), so this checks
what is on disk. All arithmetic on these values is exact in float32, so there is no rounding slack.
"""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.io import WEIGHTS_NAME

ROWS, COLS = 16, 32


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(COLS, ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def r_i() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(ROWS, dtype=torch.float32)[:, None], torch.arange(COLS, dtype=torch.float32)[None, :]


BIAS = torch.arange(ROWS, dtype=torch.float32) * 0.5 - 4.0


def w4_weight(zero_points: list[float] | None = None) -> torch.Tensor:
    """Row r: w = s_r * (t - z_r), s_r = (r + 1) / 16, z_r = (r + 1) / 2, t = (i + r) mod 16,
    except column 31, moved half a step (t = c + 0.5, or c - 0.5 where c = 15) to a rounding tie.

    Each row holds every code 0..15 in columns 0..30, so lo = -s_r z_r, hi = s_r (15 - z_r):
    scale = s_r and zero_point = z_r exactly, and q = t exactly, except the ties at column 31:
    c31 = (31 + r) mod 16 = r - 1 (r >= 1) or 15 (r = 0); t = r - 0.5 rounds to the even one of
    r - 1, r; t = 14.5 (r = 0) rounds to 14.
    """
    r, i = r_i()
    t = (i + r) % 16
    c31 = t[:, 31]
    t[:, 31] = torch.where(c31 < 15, c31 + 0.5, c31 - 0.5)
    z = torch.tensor(zero_points or W4_ZERO_POINT)[:, None]
    return (r + 1) / 16 * (t - z)


def w4_int_weight() -> torch.Tensor:
    """As `w4_weight` with integer zero points z_r = r: lo = -s_r r <= 0 <= hi = s_r (15 - r), so the
    range already holds 0, scale = s_r and zero_point = r exactly; the codes are the same."""
    return w4_weight(W4_INT_ZERO_POINT)


def w8_weight() -> torch.Tensor:
    """Row r: w = s_r * v, s_r = (r + 1) / 64; v = +127 (r even) or -127 (r odd) in column 0 and
    8i - 124 + (r mod 4) elsewhere, plus 0.5 (a tie) where i mod 4 == 1. max|v| = 127, so
    scale = 127 s_r / 127 = s_r and q = round(v + 128): column 0 gives 255 or 1; elsewhere
    8i + 4 + (r mod 4), and a tie x + 0.5 rounds to x when x is even (r even), x + 1 otherwise."""
    r, i = r_i()
    v = 8 * i - 124 + r % 4 + torch.where(i % 4 == 1, 0.5, 0.0)
    v[:, 0] = torch.where(r[:, 0] % 2 == 0, 127.0, -127.0)
    return (r + 1) / 64 * v


# (rows of) qdata, hex: w4g32 row r = nibbles (r, r+1, ...) mod 16, low nibble first
W4_QDATA = [
    "1032547698badcfe1032547698badcee",
    "21436587a9cbed0f21436587a9cbed0f",
    "32547698badcfe1032547698badcfe20",
    "436587a9cbed0f21436587a9cbed0f21",
    "547698badcfe1032547698badcfe1042",
    "6587a9cbed0f21436587a9cbed0f2143",
    "7698badcfe1032547698badcfe103264",
    "87a9cbed0f21436587a9cbed0f214365",
    "98badcfe1032547698badcfe10325486",
    "a9cbed0f21436587a9cbed0f21436587",
    "badcfe1032547698badcfe10325476a8",
    "cbed0f21436587a9cbed0f21436587a9",
    "dcfe1032547698badcfe1032547698ca",
    "ed0f21436587a9cbed0f21436587a9cb",
    "fe1032547698badcfe1032547698baec",
    "0f21436587a9cbed0f21436587a9cbed",
]
W4_SCALE = [0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5,
            0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375, 1.0]
W4_ZERO_POINT = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]
W4_INT_ZERO_POINT = [float(r) for r in range(ROWS)]

_W8_BY_R_MOD_4 = [
    "ff0c141c242c343c444c545c646c747c848c949ca4acb4bcc4ccd4dce4ecf4fc",
    "010e151d252e353d454e555d656e757d858e959da5aeb5bdc5ced5dde5eef5fd",
    "ff0e161e262e363e464e565e666e767e868e969ea6aeb6bec6ced6dee6eef6fe",
    "0110171f2730373f4750575f6770777f8790979fa7b0b7bfc7d0d7dfe7f0f7ff",
]
W8_QDATA = [_W8_BY_R_MOD_4[r % 4] for r in range(ROWS)]
W8_SCALE = [(r + 1) / 64 for r in range(ROWS)]  # 0.015625 .. 0.25, all exact in float16

SPEC = {
    "w4g32": {"act_bits": None, "act_static": False, "bits": 4, "granularity": "group",
              "group_size": 32, "percentile": 99.9, "range_method": "minmax",
              "scale_dtype": "float16", "symmetric": False, "zero_point_form": "int"},
    "w4g32-zfloat": {"act_bits": None, "act_static": False, "bits": 4, "granularity": "group",
                     "group_size": 32, "percentile": 99.9, "range_method": "minmax",
                     "scale_dtype": "float16", "symmetric": False, "zero_point_form": "float"},
    "w8": {"act_bits": None, "act_static": False, "bits": 8, "granularity": "channel",
           "group_size": None, "percentile": 99.9, "range_method": "minmax",
           "scale_dtype": "float16", "symmetric": True, "zero_point_form": "int"},
}

# key -> (safetensors dtype, shape)
LAYOUT = {
    "w4g32": {"proj.qdata": ("U8", [16, 16]), "proj.scale": ("F16", [16, 1]),
              "proj.zero_point": ("U8", [16, 1]), "proj.bias": ("F32", [16])},
    "w4g32-zfloat": {"proj.qdata": ("U8", [16, 16]), "proj.scale": ("F16", [16, 1]),
                     "proj.zero_point": ("F16", [16, 1]), "proj.bias": ("F32", [16])},
    "w8": {"proj.qdata": ("U8", [16, 32]), "proj.scale": ("F16", [16, 1]),
           "proj.bias": ("F32", [16])},
}


def f16_bytes(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}e", *values)


def f32_bytes(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


EXPECTED_BYTES = {
    "w4g32": {"proj.qdata": bytes.fromhex("".join(W4_QDATA)), "proj.scale": f16_bytes(W4_SCALE),
              "proj.zero_point": bytes(range(ROWS)),
              "proj.bias": f32_bytes([r * 0.5 - 4.0 for r in range(ROWS)])},
    "w4g32-zfloat": {"proj.qdata": bytes.fromhex("".join(W4_QDATA)), "proj.scale": f16_bytes(W4_SCALE),
              "proj.zero_point": f16_bytes(W4_ZERO_POINT),
              "proj.bias": f32_bytes([r * 0.5 - 4.0 for r in range(ROWS)])},
    "w8": {"proj.qdata": bytes.fromhex("".join(W8_QDATA)), "proj.scale": f16_bytes(W8_SCALE),
           "proj.bias": f32_bytes([r * 0.5 - 4.0 for r in range(ROWS)])},
}

WEIGHT = {"w4g32": w4_int_weight, "w4g32-zfloat": w4_weight, "w8": w8_weight}
ZERO_POINT = {"w4g32": W4_INT_ZERO_POINT, "w4g32-zfloat": W4_ZERO_POINT}
SCHEMES = ["w4g32", "w4g32-zfloat", "w8"]


def saved_file(scheme: str, folder) -> tuple[dict, bytes, One]:
    model = One()
    with torch.no_grad():
        model.proj.weight.copy_(WEIGHT[scheme]())
        model.proj.bias.copy_(BIAS)
    lowbit.quantize(model, scheme, targets=["proj"], verbose=False)
    raw = lowbit.save(model, folder).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:], model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_keys_dtypes_and_shapes(scheme, tmp_path):
    header, _, _ = saved_file(scheme, tmp_path)
    meta = header.pop("__metadata__")
    assert list(meta) == ["lowbit"]
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        k: (dt, shape) for k, (dt, shape) in LAYOUT[scheme].items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tensor_bytes(scheme, tmp_path):
    header, data, _ = saved_file(scheme, tmp_path)
    for key, want in EXPECTED_BYTES[scheme].items():
        begin, end = header[key]["data_offsets"]
        got = data[begin:end]
        if key == "proj.qdata":  # compare row by row for a readable failure
            width = len(want) // ROWS
            for r in range(ROWS):
                assert got[r * width:(r + 1) * width].hex() == want[r * width:(r + 1) * width].hex(), \
                    f"{scheme} qdata row {r}"
        assert got == want, key


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layer_entry(scheme, tmp_path):
    header, _, _ = saved_file(scheme, tmp_path)
    doc = json.loads(header["__metadata__"]["lowbit"])
    assert doc["format_version"] == 1 and doc["packing_version"] == 1 and doc["tied"] == {}
    entry = doc["layers"]["proj"]
    assert set(doc["layers"]) == {"proj"}
    assert {k: v for k, v in entry.items() if k != "sqnr_db"} == {
        "class": "QLinear", "method": "rtn", "shape": [16, 32], "spec": SPEC[scheme]}
    # the only quantization error is the ties, each half a step: one per row (w4g32*, column 31)
    # and eight per row (w8, columns 1, 5, ..., 29)
    ties = 8 if scheme == "w8" else 1
    step = W8_SCALE if scheme == "w8" else W4_SCALE
    noise = sum(ties * (0.5 * s) ** 2 for s in step)
    signal = sum(float(x) ** 2 for x in WEIGHT[scheme]().double().flatten())
    assert entry["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-12)
    assert doc["provenance"]["scheme"] == scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_weight_is_the_expected_grid(scheme, tmp_path):
    """Dequantized: equal to the float weight except at the ties, which land on the even code."""
    saved_file(scheme, tmp_path)
    loaded = lowbit.load(tmp_path, One())
    w_hat = loaded.proj.dequantized_weight()
    w = WEIGHT[scheme]()
    r = torch.arange(ROWS)
    if scheme.startswith("w4g32"):
        scale = torch.tensor(W4_SCALE)
        c31 = torch.where(r == 0, 15, r - 1)
        # (t - z) * s with t the code the tie rounds to
        q31 = torch.where(r == 0, 14, torch.where(r % 2 == 1, r - 1, r)).float()
        want = w.clone()
        want[:, 31] = (q31 - torch.tensor(ZERO_POINT[scheme])) * scale
        assert torch.equal(c31 != q31.long(), r % 2 == 0)   # even rows rounded up, r = 0 down
    else:
        scale = torch.tensor(W8_SCALE)[:, None]
        want = w.clone()
        ties = torch.arange(1, COLS, 4)
        up = (r % 2 == 1).float()[:, None]   # odd rows: x = base is odd -> rounds up
        want[:, ties] = w[:, ties] + (up - 0.5) * scale
    assert torch.equal(w_hat, want)
    assert torch.equal(loaded.proj.bias, BIAS)


def test_file_written_before_zero_point_form_loads_as_the_float_form(tmp_path):
    """Files from before `QuantSpec.zero_point_form` hold spec dicts without it and float16 zero
    points: rewrite a -zfloat file's header that way (the tensor checksum does not cover the
    header) and load it: the layer is the float form, with the golden grid."""
    header, data, _ = saved_file("w4g32-zfloat", tmp_path)
    doc = json.loads(header["__metadata__"]["lowbit"])
    del doc["layers"]["proj"]["spec"]["zero_point_form"]
    assert doc["layers"]["proj"]["spec"] == {k: v for k, v in SPEC["w4g32-zfloat"].items()
                                             if k != "zero_point_form"}
    header["__metadata__"]["lowbit"] = json.dumps(doc)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / WEIGHTS_NAME
    assert path.is_file()  # the file saved_file wrote: overwrite it
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert b"zero_point_form" not in path.read_bytes()
    loaded = lowbit.load(tmp_path, One())
    assert loaded.proj.spec.zero_point_form == "float" and loaded.proj.spec.name == "w4g32-zfloat"
    assert loaded.proj.zero_point.dtype == torch.float16
    assert loaded.proj.zero_point.flatten().tolist() == W4_ZERO_POINT
