"""What every quantized module shares: its `QuantizedWeight` as state-dict buffers."""
from __future__ import annotations

import torch

from ..primitives import QuantizedWeight
from ..spec import QuantSpec


class QuantizedModule(torch.nn.Module):
    """Holds ``qdata``, ``scale`` and (asymmetric) ``zero_point`` buffers plus spec and method.

    ``sqnr_db`` is the weight's signal-to-quantization-noise ratio measured when it was quantized
    (None when unknown); it travels in the file header.
    """

    def _set_weight(self, qw: QuantizedWeight, method: str, sqnr_db: float | None) -> None:
        self.spec: QuantSpec = qw.spec
        self.method = method
        self.sqnr_db = sqnr_db
        self.weight_shape = tuple(qw.shape)
        self.register_buffer("qdata", qw.qdata)
        self.register_buffer("scale", qw.scale)
        if qw.zero_point is not None:
            self.register_buffer("zero_point", qw.zero_point)
        else:
            self.zero_point = None

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.scale, self.zero_point, self.spec, self.weight_shape)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        return self.qweight.nbytes

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, scheme={self.spec.name}, method={self.method}"
