"""`LayerStats`: what calibration measured about one layer's inputs, handed to algorithms."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerStats:
    """input_range: per-tensor (lo, hi) of the layer's inputs seen in calibration, or None;
    hessian: ``X^T X / n`` over every input row (in_features, in_features), or None;
    samples: input rows seen."""
    input_range: tuple[float, float] | None = None
    hessian: torch.Tensor | None = None
    samples: int = 0
