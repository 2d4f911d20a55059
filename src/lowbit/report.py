"""Human-readable reports of lowbit files."""
from __future__ import annotations

import math
import os

from .io.serialize import read_file, weights_path


def inspect_table(path: str | os.PathLike) -> str:
    """Per-layer table (scheme, shape, bytes, bits/weight, SQNR dB vs float) and file totals."""
    target = weights_path(path)
    doc, tensors = read_file(target)
    head = f"{'layer':<48}{'class':<11}{'scheme':<12}{'shape':<14}{'bytes':>10}{'bits/w':>8}{'SQNR dB':>9}"
    lines = [head, "-" * len(head)]
    q_bytes = float_bytes = 0
    for name, e in doc["layers"].items():
        keys = [f"{name}.{k}" for k in ("qdata", "scale", "zero_point") if f"{name}.{k}" in tensors]
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        numel = math.prod(e["shape"])
        q_bytes, float_bytes = q_bytes + nbytes, float_bytes + 4 * numel
        db = e.get("sqnr_db")
        db_text = "n/a" if db is None else f"{float(db):.1f}"
        shape = "x".join(map(str, e["shape"]))
        lines.append(f"{name[-47:]:<48}{e['class']:<11}{_scheme(e):<12}{shape:<14}{nbytes:>10}"
                     f"{8 * nbytes / numel:>8.2f}{db_text:>9}")
    prov = doc.get("provenance", {})
    lines.append(f"{len(doc['layers'])} quantized layers: {q_bytes / 1e6:.2f} MB "
                 f"(fp32: {float_bytes / 1e6:.2f} MB, {q_bytes / max(float_bytes, 1):.3f}x); "
                 f"file {target.stat().st_size / 1e6:.2f} MB; format {doc['format_version']}; "
                 f"lowbit {prov.get('lowbit_version', '?')}, torch {prov.get('torch_version', '?')}")
    return "\n".join(lines)


def _scheme(entry: dict) -> str:
    from .spec import QuantSpec
    return QuantSpec.from_dict(entry["spec"]).name
