"""Human-readable reports of lowbit files."""
from __future__ import annotations

import math
import os

import torch

from .io.reader import read_file, weights_path
from .provenance import describe
from .spec import QuantSpec
from .textable import text_table


def inspect_table(path: str | os.PathLike) -> str:
    """Per-layer table (scheme, shape, bytes, bits/weight, SQNR dB vs float) and file totals.
    The file is fully verified first: a malformed one raises `FormatError` naming the problem."""
    target = weights_path(path)
    doc, tensors = read_file(target)
    rows, q_bytes, float_bytes = [], 0, 0
    for name, e in doc["layers"].items():
        nbytes = sum(tensors[f"{name}.{t}"].numel() * tensors[f"{name}.{t}"].element_size()
                     for t in e["tensors"])
        numel = math.prod(e["shape"])
        q_bytes, float_bytes = q_bytes + nbytes, float_bytes + 4 * numel
        db = e.get("sqnr_db")
        if e["kind"] == "codebook":  # product quantization: k centroids of block_size values
            scheme = f"pq k{tensors[f'{name}.centroids'].shape[0]} b{e['block_size']}"
        else:
            scheme = QuantSpec.from_dict(e["spec"]).name + ("" if e.get("input") is None else " +a8")
            scheme += " smooth" if e.get("input_smooth") else ""
        rows.append((name, e["class"], scheme, "x".join(map(str, e["shape"])), nbytes,
                     f"{8 * nbytes / numel:.2f}", "n/a" if db is None else f"{float(db):.1f}"))
    table = text_table(("layer", "class", "scheme", "shape", "bytes", "bits/w", "SQNR dB"), rows,
                       (False, False, False, False, True, True, True))
    prov = doc["provenance"]
    return (f"{table}\n{describe(prov)}\n{len(doc['layers'])} quantized layers: {q_bytes / 1e6:.2f} MB "
            f"(fp32: {float_bytes / 1e6:.2f} MB, {q_bytes / max(float_bytes, 1):.3f}x); "
            f"file {target.stat().st_size / 1e6:.2f} MB; format {doc['format_version']}; "
            f"lowbit {prov.get('lowbit_version', '?')}, torch {prov.get('torch_version', '?')}; "
            f"side files verified: {len(doc['files'])}")


def model_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor a model holds: parameters, buffers (persistent or not) and derived
    kernel state (tensors in module attributes, also inside dicts, lists and tuples: packed
    weights, kernel scales, prepared forms, caches). Storage shared by several tensors (views,
    aliases, tied weights) counts once, whole; meta tensors count nothing.

    The memory figure of issue 6 compares this with the bytes of the saved file's tensors."""
    seen: dict[tuple, int] = {}
    for module in model.modules():
        found = list(module._parameters.values()) + list(module._buffers.values())
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                found.extend(_tensors_in(value, depth=2))
        for t in found:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                seen.update([_storage_entry(t)])
    return sum(seen.values())


def _tensors_in(value, depth: int) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth and isinstance(value, dict):
        value = list(value.values())
    if depth and isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth - 1)]
    return []


def _storage_entry(t: torch.Tensor) -> tuple[tuple, int]:
    """(key, bytes) of the storage behind ``t``; opaque tensors (oneDNN-packed weights) have no
    storage to share and count by their own size."""
    try:
        storage = t.untyped_storage()
        return ("storage", storage.data_ptr(), t.device.type), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return ("opaque", id(t)), t.numel() * t.element_size()
