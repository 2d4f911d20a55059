"""`LayerStats`: what calibration measured about one layer's inputs, handed to algorithms."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerStats:
    """What one layer received in calibration (`lowbit.calibrate.collect` makes these):

    input_range: (lo, hi) of its inputs chosen by the observer (scalars per tensor, or per input
                 channel), or None when ranges were not collected;
    hessian:     ``X^T X / n`` over every input row, (in_features, in_features), or None; float32
                 from `collect` (summed in float64, rounded once: GPTQ computes in float32);
    samples:     input rows seen.
    """
    input_range: tuple[torch.Tensor, torch.Tensor] | None = None
    hessian: torch.Tensor | None = None
    samples: int = 0
