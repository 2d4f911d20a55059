"""Which compute path a quantized layer takes for a given number of input rows: measured on this
host by `kernels.select.KernelSelector` (timed once per weight-shape class and row bucket, cached
on disk per CPU, torch build and thread count), remembered per layer and bucket.

A layer's ``selector`` attribute (None: the process-wide `default_selector`, created on first use;
it holds measurements only, never a switch) can be set to `KernelSelector.pinned([...])` for
deterministic tests, or ``LOWBIT_KERNEL=<path>`` forces a path everywhere.
"""
from __future__ import annotations

import torch

from ..kernels.select import KernelSelector, row_bucket, shape_class

_default: KernelSelector | None = None


def default_selector() -> KernelSelector:
    global _default
    if _default is None:
        _default = KernelSelector()
    return _default


def shape_key(module: torch.nn.Module) -> str:
    """The weight-shape class of a quantized layer (its input mode included)."""
    spec = module.spec
    mode = "w" if module.input_spec is None else ("a8s" if module.input_spec.static else "a8")
    rows = module.weight_shape[0]
    cols = 1
    for d in module.weight_shape[1:]:
        cols *= d
    return shape_class(mode, spec.bits, spec.group_size, rows, cols)


def choose_path(module: torch.nn.Module, rows: int) -> str:
    """The path for ``rows`` rows: the layer's remembered choice for the bucket (the per-call
    cost), else the selector's (which may time the layer's `candidates()` once)."""
    bucket, _ = row_bucket(rows)
    path = module._paths.get(bucket)
    if path is None:
        key = shape_key(module)
        candidates = module.candidates()
        if len(candidates) == 1:
            path = next(iter(candidates))
        else:
            path = selector_of(module).choose(key, rows, candidates, reference_candidate(module))
        module._paths[bucket] = path
    return path


def selector_of(module: torch.nn.Module) -> KernelSelector:
    return getattr(module, "selector", None) or default_selector()


def timing_input(cols: int):
    """A callable m -> a contiguous float32 (m, cols) input, made once per m (timing must see the
    memory layout real activations have: an expanded stride-0 tensor takes other kernels)."""
    made: dict[int, torch.Tensor] = {}

    def get(m: int) -> torch.Tensor:
        if m not in made:
            made[m] = torch.randn(m, cols)
        return made[m]
    return get


def reference_candidate(module: torch.nn.Module):
    """The float layer this one replaces, as a callable of a row count (timed, never chosen)."""
    w = module.dequantized_weight(torch.float32).reshape(module.weight_shape[0], -1)
    x = timing_input(w.shape[1])
    return lambda m: torch.nn.functional.linear(x(m), w)


def speed_vs_float(module: torch.nn.Module, rows: int) -> tuple[str, float | None, float | None]:
    """(path, its time / the float layer's, its time - the float layer's in ms) for ``rows`` rows
    on this host; the figures are None when the path was pinned, forced, or is the layer's only
    one (nothing was timed)."""
    path = module.path_for(rows)
    if module.force_path or len(module.candidates()) == 1:
        return path, None, None
    entry = selector_of(module).timings(shape_key(module), rows)
    ms = (entry or {}).get("ms", {})
    if path in ms and ms.get("fp32"):
        return path, ms[path] / ms["fp32"], ms[path] - ms["fp32"]
    return path, None, None
