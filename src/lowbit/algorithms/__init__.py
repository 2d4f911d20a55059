"""Quantization algorithms: functions on tensors, no module surgery.

Every algorithm has the signature ``algorithm(weight, spec, name, stats=None) -> QuantizedWeight``:
``stats`` is the layer's `LayerStats` from calibration (input ranges, Hessian), None for
algorithms that need no data. `NEEDS_DATA` names the ones that need it.
"""
from .rtn import rtn
from .stats import LayerStats

ALGORITHMS = {"rtn": rtn}
NEEDS_DATA: frozenset[str] = frozenset()

__all__ = ["ALGORITHMS", "LayerStats", "NEEDS_DATA", "rtn"]
