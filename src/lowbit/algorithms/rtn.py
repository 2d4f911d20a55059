"""Round-to-nearest (RTN): each weight is rounded to its nearest code under the chosen range."""
from __future__ import annotations

import torch

from ..primitives import QuantizedWeight, quantize_weight
from ..spec import QuantSpec
from .stats import LayerStats


def rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight",
        stats: LayerStats | None = None) -> QuantizedWeight:
    """Needs no calibration data; ``stats`` is accepted and unused."""
    return quantize_weight(weight, spec, name)
