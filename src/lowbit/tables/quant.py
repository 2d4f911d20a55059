"""Row-wise quantization of embedding tables in scale-and-bias form, and its two decoders.

Each row gets its own range ``[lo, hi]`` (min-max, or the greedy search of Guan et al.,
"Post-Training 4-bit Quantization on Embedding Tables", arXiv 1911.02079, both from
`primitives.ranges`). The table stores::

    scale = (hi - lo) / (2**bits - 1)      rounded up to the parameter dtype (never shrinks the grid)
    bias  = lo                             in the parameter dtype
    code  = clamp(round((x - bias) / scale), 0, 2**bits - 1)
    x_hat = code * scale + bias

Quantization and dequantization use the same scale (Paddle Cube's ``seq_generator`` divided by
``2**bits`` on the way back: a systematic shrink toward ``min``). Rounding and clamping are the
primitives': codes come from `primitives.affine.quantize_codes` under an explicit unit-scale,
zero-offset spec, so the table does not depend on how the primitives store a zero point.
The error of one element is at most ``scale / 2`` plus the parameter dtype's rounding of ``bias``.

`decode_records` (numpy, a 256-entry byte -> codes table built once per layout) is the fast path;
`decode_reference` (plain torch: unpack, multiply, add) is its twin, parity-tested.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..primitives.affine import SMALLEST_SCALE, _round_up, quantize_codes
from ..primitives.packing import pack, unpack
from ..primitives.ranges import choose_range
from ..spec import QuantSpec
from .format import Layout, TableError

RANGE_METHODS = ("minmax", "greedy")
_TORCH = {"float16": torch.float16, "float32": torch.float32}
_NUMPY = {"float16": np.float16, "float32": np.float32}


def _range_spec(layout: Layout, range_method: str) -> QuantSpec:
    if range_method not in RANGE_METHODS:
        raise TableError(f"range_method must be one of {RANGE_METHODS}, found {range_method!r}")
    # the table's grid is scale-and-bias (the row minimum maps exactly): the float zero point form
    return QuantSpec(bits=layout.bits, symmetric=False, granularity="row",
                     scale_dtype=layout.scale_dtype, range_method=range_method, zero_point_form="float")


def row_params(x: torch.Tensor, layout: Layout, range_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows (n, dim) -> scale, bias (n, 1) in the parameter dtype."""
    spec = _range_spec(layout, range_method)
    lo, hi = choose_range(x.reshape(x.shape[0], 1, -1), spec)  # (n, 1) each
    dt = _TORCH[layout.scale_dtype]
    scale = _round_up(((hi - lo) / spec.qmax).clamp(min=SMALLEST_SCALE[layout.scale_dtype]), dt)
    return scale, lo.to(dt)


def quantize_rows(x: torch.Tensor, layout: Layout, range_method: str = "minmax",
                  first_key: int = 0) -> np.ndarray:
    """float32 rows (n, dim) -> records uint8 (n, record_bytes). ``first_key`` names rows in errors."""
    return encode_rows(x, layout, range_method, first_key)[0]


def encode_rows(x: torch.Tensor, layout: Layout, range_method: str = "minmax",
                first_key: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """float32 rows (n, dim) -> (records (n, record_bytes), the rows they decode to (n, dim))."""
    x = x.float()
    _check_finite(x.amax(dim=1) + x.amin(dim=1), first_key)  # NaN/Inf anywhere makes this non-finite
    if not layout.quantized:
        raw = x.to(torch.float16 if layout.bits == 16 else torch.float32)
        back = raw.float()
        _check_finite(back.amax(dim=1) - back.amin(dim=1), first_key, "overflows float16; use bits 32")
        return raw.numpy().view(np.uint8).reshape(x.shape[0], -1), back
    scale, bias = row_params(x, layout, range_method)  # (n, 1) each
    params = torch.cat([scale, bias], 1)  # (n, 2)
    _check_finite(params.float().sum(dim=1), first_key,
                  f"overflows {layout.scale_dtype} scale/bias; use scale_dtype float32")
    unit = QuantSpec(bits=layout.bits, symmetric=False, granularity="row", zero_point_form="float")
    s32, b32 = scale.float(), bias.float()
    shifted = (x - b32).unsqueeze(1)  # (n, 1, dim)
    codes = quantize_codes(shifted, s32, torch.zeros_like(s32), unit).reshape(x.shape)  # (n, dim)
    back = codes.float() * s32 + b32  # what decode_reference gives (same float32 operations)
    packed = pack(codes, layout.bits).numpy()  # (n, code_bytes)
    return np.concatenate([packed, params.numpy().view(np.uint8)], axis=1), back  # | codes | scale | bias |


def _check_finite(v: torch.Tensor, first_key: int, why: str = "has NaN/Inf values") -> None:
    """``v``: one value per row, non-finite where the row is bad."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise TableError(f"row {first_key + row} (position in key order) {why}; refusing to build")


def decode_reference(records: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The plain twin: uint8 records (n, record_bytes) -> float32 rows (n, dim)."""
    n = records.shape[0]
    if not layout.quantized:
        dt = torch.float16 if layout.bits == 16 else torch.float32
        return records.contiguous().view(dt).float().reshape(n, layout.dim)
    c, p, dt = layout.code_bytes, layout.param_bytes, _TORCH[layout.scale_dtype]
    codes = unpack(records[:, :c].contiguous(), layout.bits, layout.dim).float()  # (n, dim)
    scale = records[:, c:c + p].contiguous().view(dt).float()  # (n, 1)
    bias = records[:, c + p:].contiguous().view(dt).float()  # (n, 1)
    return codes * scale + bias


@lru_cache(maxsize=None)
def code_table(bits: int) -> np.ndarray:
    """(256, 8 // bits) float32: the codes one packed byte holds, lowest bits first."""
    per = 8 // bits
    byte = np.arange(256, dtype=np.int32)[:, None]
    shifts = np.arange(per, dtype=np.int32)[None, :] * bits
    return ((byte >> shifts) & ((1 << bits) - 1)).astype(np.float32)


def decode_records(records: np.ndarray, layout: Layout) -> np.ndarray:
    """The fast path: uint8 records (n, record_bytes) -> float32 rows (n, dim)."""
    n = records.shape[0]
    if not layout.quantized:
        dt = np.float16 if layout.bits == 16 else np.float32
        return np.ascontiguousarray(records).view(dt).reshape(n, layout.dim).astype(np.float32, copy=False)
    c = layout.code_bytes
    params = np.ascontiguousarray(records[:, c:]).view(_NUMPY[layout.scale_dtype])  # (n, 2): scale, bias
    params = params.astype(np.float32, copy=False)
    out = np.take(code_table(layout.bits), records[:, :c], axis=0).reshape(n, -1)  # (n, c * per)
    if out.shape[1] != layout.dim:
        out = out[:, :layout.dim]
    out *= params[:, :1]
    out += params[:, 1:]
    return out


def fused_rowwise_op(layout: Layout):
    """torch's FBGEMM row-wise embedding-bag kernel that reads this record layout as is (4 or 2 bits
    with float16 scale and bias after the codes), or None. Called with one bag per key it returns the
    dequantized rows ``code * scale + bias``; parity-tested against `decode_reference`."""
    if layout.bits not in (4, 2) or layout.scale_dtype != "float16":
        return None
    name = {4: "embedding_bag_4bit_rowwise_offsets", 2: "embedding_bag_2bit_rowwise_offsets"}[layout.bits]
    try:
        return getattr(torch.ops.quantized, name)
    except (AttributeError, RuntimeError):  # a torch build without FBGEMM: the numpy path serves
        return None


def row_errors(x: torch.Tensor, back: torch.Tensor) -> dict:
    """Error sums of a chunk (rows ``x``, decoded ``back``) for the manifest's summary."""
    err = back - x.float()  # (n, dim)
    sq = err.square()
    row_sq = sq.sum(dim=1)  # (n,)
    row_rmse = (row_sq / max(err.shape[1], 1)).sqrt()
    return {"rows": x.shape[0], "elements": err.numel(),
            "sum_err": float(err.sum(dim=1).double().sum()), "sum_sq_err": float(row_sq.double().sum()),
            "sum_sq_x": float(x.float().square().sum(dim=1).double().sum()),
            "max_abs_err": float(err.abs().max()) if err.numel() else 0.0,
            "sum_row_rmse": float(row_rmse.double().sum()),
            "max_row_rmse": float(row_rmse.max()) if row_rmse.numel() else 0.0}


def merge_errors(parts: list[dict]) -> dict:
    tot = {k: sum(p[k] for p in parts) for k in ("rows", "elements", "sum_err", "sum_sq_err",
                                                  "sum_sq_x", "sum_row_rmse")}
    tot["max_abs_err"] = max((p["max_abs_err"] for p in parts), default=0.0)
    tot["max_row_rmse"] = max((p["max_row_rmse"] for p in parts), default=0.0)
    return tot


def error_summary(tot: dict) -> dict:
    """Readable summary: mean error (bias), RMSE, SQNR, per-row RMSE mean and max."""
    n, rows = max(tot["elements"], 1), max(tot["rows"], 1)
    sq = tot["sum_sq_err"]
    sqnr = 10 * np.log10(tot["sum_sq_x"] / sq) if sq > 0 and tot["sum_sq_x"] > 0 else float("inf")
    return {"mean_error": tot["sum_err"] / n, "rmse": (sq / n) ** 0.5, "sqnr_db": float(sqnr),
            "max_abs_error": tot["max_abs_err"], "row_rmse_mean": tot["sum_row_rmse"] / rows,
            "row_rmse_max": tot["max_row_rmse"]}
