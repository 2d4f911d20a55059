"""Quantization algorithms: functions on tensors, no module surgery.

``ALGORITHMS[method](weight, spec, name, stats=None) -> QuantizedWeight`` is the one signature
`apply` calls; ``stats`` (a `LayerStats`) carries what calibration measured for the layer.
`NEEDS_DATA` names the methods that need calibration data.
"""
from __future__ import annotations

import torch

from ..errors import QuantizationError
from ..primitives import QuantizedWeight
from ..spec import QuantSpec
from .gptq import gptq
from .rtn import rtn
from .stats import LayerStats


def gptq_with_stats(weight: torch.Tensor, spec: QuantSpec, name: str = "weight",
                    stats: LayerStats | None = None) -> QuantizedWeight:
    """`gptq` with its defaults (damp 0.01, act order, block 128) under the common signature."""
    if stats is None or stats.hessian is None:
        raise QuantizationError(f"{name}: method 'gptq' needs calibration data (the Hessian of the "
                                "layer's inputs); pass data=... or use method='rtn'")
    return gptq(weight, stats.hessian, spec, name=name)


ALGORITHMS = {"rtn": rtn, "gptq": gptq_with_stats}
NEEDS_DATA = frozenset({"gptq"})

__all__ = ["ALGORITHMS", "LayerStats", "NEEDS_DATA", "gptq", "gptq_with_stats", "rtn"]
