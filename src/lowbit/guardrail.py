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
SLOWER = 1.10        # a path above this many times fp32's time here is named in a warning ...
SLOWER_MS = 0.02     # ... when it also costs this much more per call (microsecond noise is not news)


@dataclass(frozen=True)
class LayerSpeed:
    name: str
    scheme: str
    paths: tuple[tuple[int, str, float | None, float | None], ...]  # (rows, path, x fp32, ms over fp32)


def layer_speeds(model: torch.nn.Module) -> list[LayerSpeed]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QLinearA8)) and not m.qdata.is_meta:
            scheme = m.spec.name + ("" if m.input_spec is None else f"+{m.input_spec.name}")
            out.append(LayerSpeed(name, scheme, tuple((r, *speed_vs_float(m, r)) for r in ROWS)))
    return out


def summarize(speeds: list[LayerSpeed]) -> tuple[list[str], list[str]]:
    """(lines per scheme and row count: paths taken and the range of ratios; warnings, one per
    scheme, row count and path, naming the layers)."""
    lines, slow, by = [], {}, {}
    for s in speeds:
        for rows, path, ratio, extra_ms in s.paths:
            by.setdefault((s.scheme, rows), []).append((path, ratio))
            if ratio is not None and ratio > SLOWER and extra_ms > SLOWER_MS:
                slow.setdefault((s.scheme, rows, path), []).append((s.name, ratio))
        if s.paths[0][1] == "ref":
            slow.setdefault((s.scheme, None, "ref"), []).append((s.name, None))
    for (scheme, rows), items in by.items():
        paths = sorted({p for p, _ in items})
        ratios = [r for _, r in items if r is not None]
        span = (f"{min(ratios):.2f}-{max(ratios):.2f}x fp32" if ratios else
                "slower than fp32 (dequantized every call)" if paths == ["ref"] else "pinned, not timed")
        lines.append(f"  {scheme} at {rows} row(s): {', '.join(paths)}; {span}")
    return lines, [_warning(key, layers) for key, layers in slow.items()]


def _warning(key: tuple, layers: list[tuple[str, float | None]]) -> str:
    scheme, rows, path = key
    names = ", ".join(n for n, _ in layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    if rows is None:
        return (f"{scheme} has no fast kernel on this CPU: {len(layers)} layer(s) ({names}) dequantize "
                "their weight on every call, slower than float (this saves memory and disk, not time)")
    worst = max(r for _, r in layers)
    return (f"{scheme} at {rows} row(s): {len(layers)} layer(s) ({names}) take path {path}, up to "
            f"{worst:.2f}x the float layer's time on this CPU (no faster quantized path here)")
