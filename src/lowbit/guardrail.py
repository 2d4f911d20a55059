"""The speed guardrail: which path each quantized Linear takes at one row and at a large batch on
this host, how that compares with the float layer, and a warning by name where it is slower.

The figures are the kernel selector's measurements (`kernels.select`), taken on this machine when
the layer first met that row count (quantize asks for both counts, which warms the cache)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .nn import QLinear, QLinearA8
from .nn.selection import speed_vs_float

ROWS = (1, 256)      # one token, and a batch of a few sentences
SLOWER = 1.10        # a path above this many times fp32's time here is named in a warning


@dataclass(frozen=True)
class LayerSpeed:
    name: str
    scheme: str
    paths: tuple[tuple[int, str, float | None], ...]  # (rows, path, time / fp32's)


def layer_speeds(model: torch.nn.Module) -> list[LayerSpeed]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QLinearA8)) and not m.qdata.is_meta:
            scheme = m.spec.name + ("" if m.input_spec is None else f"+{m.input_spec.name}")
            out.append(LayerSpeed(name, scheme, tuple((r, *speed_vs_float(m, r)) for r in ROWS)))
    return out


def summarize(speeds: list[LayerSpeed]) -> tuple[list[str], list[str]]:
    """(lines per scheme and row count: paths taken and the range of ratios, warnings by name)."""
    lines, warnings = [], []
    by: dict[tuple[str, int], list[tuple[str, float | None]]] = {}
    for s in speeds:
        for rows, path, ratio in s.paths:
            by.setdefault((s.scheme, rows), []).append((path, ratio))
            if ratio is not None and ratio > SLOWER:
                warnings.append(f"{s.name}: {s.scheme} takes path {path} at {rows} row(s), "
                                f"{ratio:.2f}x the float layer's time on this CPU (no faster path here)")
        if s.paths[0][1] == "ref":
            warnings.append(f"{s.name}: {s.scheme} has no fast kernel on this CPU: the weight is "
                            "dequantized on every call, slower than float (it saves memory and disk, "
                            "not time)")
    for (scheme, rows), items in by.items():
        paths = sorted({p for p, _ in items})
        ratios = [r for _, r in items if r is not None]
        span = (f"{min(ratios):.2f}-{max(ratios):.2f}x fp32" if ratios else
                "slower than fp32 (dequantized every call)" if paths == ["ref"] else "pinned, not timed")
        lines.append(f"  {scheme} at {rows} row(s): {', '.join(paths)}; {span}")
    return lines, warnings
