"""What a calibrated quantization records in the file header (``provenance``), so that a file says
how it was made: the method and its options (every one changes the result), the calibration data's
hash and size, and whether it ran block by block. `lowbit inspect` prints it (`describe`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .algorithms import NEEDS_DATA, resolved_options
from .io.format import tensors_sha256
from .recipe import Plan

# provenance keys that `io.load` carries back onto the model (so that a re-save keeps them)
CARRIED = ("scheme", "method", "methods", "source_sha256", "method_options", "calibration", "sequential")


def as_batches(data: Any) -> Any:
    """``data`` as a list, read once (a generator is consumed here); None and a single tensor or
    dict pass through unchanged (calibration rejects those with a message saying what to pass)."""
    if data is None or isinstance(data, (torch.Tensor, Mapping, str, bytes)):
        return data
    return list(data)


def batch_tensors(data: list) -> dict[str, torch.Tensor]:
    """Every tensor of every batch, named ``<batch>.<key or position>`` (batch zero-padded so the
    names sort in batch order); non-tensor values (flags) are left out."""
    out: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(data):
        if isinstance(batch, torch.Tensor):
            items = {"0": batch}
        elif isinstance(batch, Mapping):
            items = dict(batch)
        elif isinstance(batch, (tuple, list)):
            items = {str(j): t for j, t in enumerate(batch)}
        else:
            items = {}
        out.update({f"{i:06d}.{k}": t for k, t in items.items() if isinstance(t, torch.Tensor)})
    return out


def calibration_info(data: list) -> dict[str, Any]:
    """sha256 of the batches' tensors (`io.format.tensors_sha256`), batches, samples (rows of each
    batch's first tensor) and tokens (elements of ``input_ids`` where batches have them)."""
    tensors = batch_tensors(data)
    firsts = [t for k, t in tensors.items() if k.endswith((".0", ".input_ids"))]
    tokens = sum(t.numel() for k, t in tensors.items() if k.endswith(".input_ids"))
    return {"sha256": tensors_sha256(tensors), "batches": len(data),
            "samples": sum(int(t.shape[0]) if t.dim() else 1 for t in firsts),
            **({"tokens": tokens} if tokens else {})}


def main_method(plan: Plan, default: str = "rtn") -> str:
    """The method a file is named by: the data-driven one when a layer uses it (GPTQ with RTN
    embeddings is a GPTQ file), else the one every layer uses, else ``default``. ``methods``
    (`method_provenance`) says which layers took which."""
    used = {r.method for r in plan.layers.values()}
    data_driven = sorted(used & NEEDS_DATA)
    return data_driven[0] if data_driven else (used.pop() if len(used) == 1 else default)


def method_provenance(plan: Plan, data: list | None, sequential: bool) -> dict[str, Any]:
    """The provenance entries of a quantization: ``methods`` (method -> how many layers used it),
    ``method_options`` per method used that has options (defaults filled in; absent when none
    has), and for a data-driven method ``calibration`` and ``sequential``."""
    options: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for rule in plan.layers.values():
        options.setdefault(rule.method, resolved_options(rule.method, dict(rule.options)))
        counts[rule.method] = counts.get(rule.method, 0) + 1
    used = {m: o for m, o in options.items() if o}
    out: dict[str, Any] = {"methods": dict(sorted(counts.items()))}
    if used:
        out["method_options"] = used
    if isinstance(data, list) and any(m in NEEDS_DATA for m in options):
        out.update(calibration=calibration_info(data), sequential=bool(sequential))
    return out


def describe(prov: Mapping[str, Any]) -> str:
    """One line per recorded fact: method and options, calibration data, sequential."""
    lines = [f"method: {prov.get('method', '?')}"]
    methods = prov.get("methods") or {}
    if len(methods) > 1:  # say which layers took which (embeddings: always rtn, no input Hessian)
        lines[0] += " (" + ", ".join(f"{m}: {n} layer{'s' * (n != 1)}" for m, n in methods.items()) + ")"
    for method, opts in (prov.get("method_options") or {}).items():
        lines[0] += f"; {method} " + ", ".join(f"{k}={v}" for k, v in opts.items())
    cal = prov.get("calibration")
    if cal:
        tokens = f", {cal['tokens']} tokens" if "tokens" in cal else ""
        lines.append(f"calibration: {cal.get('samples')} samples in {cal.get('batches')} batches"
                     f"{tokens}, sha256 {str(cal.get('sha256'))[:16]}...; "
                     f"sequential: {prov.get('sequential', False)}")
    return "\n".join(lines)
