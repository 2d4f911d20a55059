"""Round-to-nearest (RTN): each weight is rounded to its nearest code under the chosen range."""
from __future__ import annotations

import torch

from ..primitives import QuantizedWeight, quantize_weight
from ..spec import QuantSpec
from .stats import LayerStats


def rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight",
        stats: LayerStats | None = None) -> QuantizedWeight:
    """Needs no calibration: ``stats`` is accepted (the common signature) and ignored."""
    return quantize_weight(weight, spec, name)
