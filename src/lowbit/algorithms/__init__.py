"""Quantization algorithms: functions on tensors, no module surgery."""
from .rtn import rtn

ALGORITHMS = {"rtn": rtn}

__all__ = ["ALGORITHMS", "rtn"]
