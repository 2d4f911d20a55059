"""Round-to-nearest (RTN): each weight is rounded to its nearest code under the chosen range."""
from __future__ import annotations

import torch

from ..primitives import QuantizedWeight, quantize_weight
from ..spec import QuantSpec


def rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    return quantize_weight(weight, spec, name)
