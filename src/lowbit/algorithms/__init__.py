"""Quantization algorithms: functions on tensors, no module surgery.

``ALGORITHMS[method](weight, spec, name, stats=None, **options) -> QuantizedWeight`` is the one
signature `apply` calls; ``stats`` (a `LayerStats`) carries what calibration measured for the layer
and ``options`` are the rule's method options (`METHOD_OPTIONS` lists each method's, with its
defaults; `check_options` validates them). `NEEDS_DATA` names the methods that need calibration data.
"""
from __future__ import annotations

import torch

from ..errors import QuantizationError
from ..primitives import QuantizedWeight
from ..spec import QuantSpec
from .gptq import DEFAULT_DAMP, gptq
from .rtn import rtn
from .stats import LayerStats


def gptq_with_stats(weight: torch.Tensor, spec: QuantSpec, name: str = "weight",
                    stats: LayerStats | None = None, **options) -> QuantizedWeight:
    """`gptq` under the common signature; ``options``: damp (0.1), act_order (True), block_size (128)."""
    if stats is None or stats.hessian is None:
        raise QuantizationError(f"{name}: method 'gptq' needs calibration data (the Hessian of the "
                                "layer's inputs); pass data=... or use method='rtn'")
    return gptq(weight, stats.hessian, spec, name=name, **check_options("gptq", options))


ALGORITHMS = {"rtn": rtn, "gptq": gptq_with_stats}
NEEDS_DATA = frozenset({"gptq"})
# method -> option -> default; every option changes the result, so files record them (provenance)
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "rtn": {}, "gptq": {"damp": DEFAULT_DAMP, "act_order": True, "block_size": 128}}


def check_options(method: str, options: dict) -> dict:
    """``options`` checked against `METHOD_OPTIONS[method]` (unknown names and bad values raise
    ValueError naming them); returns them unchanged, without the defaults filled in."""
    valid = METHOD_OPTIONS.get(method, {})
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: "
                         f"{valid or 'none'}")
    for key, value in options.items():
        default = valid[key]
        ok = isinstance(value, bool) if isinstance(default, bool) else \
            (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
             and (isinstance(value, int) or not isinstance(default, int)))
        if not ok:
            raise ValueError(f"method {method!r} option {key!r} must be a positive "
                             f"{type(default).__name__}, found {value!r}")
    return dict(options)


def resolved_options(method: str, options: dict) -> dict:
    """The method's options with its defaults filled in (what a file's provenance records)."""
    return {**METHOD_OPTIONS.get(method, {}), **check_options(method, options)}

__all__ = ["ALGORITHMS", "LayerStats", "METHOD_OPTIONS", "NEEDS_DATA", "check_options", "resolved_options", "gptq", "gptq_with_stats", "rtn"]
