"""What a calibration step hands an algorithm for one layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one layer's inputs.

    hessian: (in, in) float, proportional to ``X^T X / n`` over the ``samples`` input rows ``X``
             the layer saw (GPTQ needs only its direction: damping is relative to its diagonal).
    samples: how many input rows went into it (for provenance and sanity checks).
    """

    hessian: torch.Tensor | None = None
    samples: int = 0
