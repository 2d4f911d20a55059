"""`QConv2d`: weight-only quantized Conv2d. No packed conv kernel exists on this CPU in torch, so
the weight is dequantized to fp32 on every call (smaller on disk and in memory at rest, not faster)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QuantizedWeight
from ..spec import ActSpec
from .base import QuantizedModule
from .registry import register


def take_conv_geometry(module: torch.nn.Module, conv: torch.nn.Conv2d) -> None:
    """Stride, padding, dilation, groups and a float32 copy of the bias (frozen) from the float
    convolution a quantized one replaces (`QConv2d`, `nn.qlinear_a8.QConv2dA8`)."""
    module.stride, module.padding, module.dilation = conv.stride, conv.padding, conv.dilation
    module.groups = conv.groups
    module.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().float(),
                                                                    requires_grad=False)


@register(torch.nn.Conv2d, "affine")
class QConv2d(QuantizedModule):
    def __init__(self, qw: QuantizedWeight, conv: torch.nn.Conv2d, method: str = "rtn",
                 sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv2d supports padding_mode='zeros' only, found {conv.padding_mode!r}")
        self._set_weight(qw, method, sqnr_db, input_spec)
        take_conv_geometry(self, conv)
        self.rebuild()

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> "QConv2d":
        return cls(qw, conv, method, sqnr_db, input_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(torch.float32)
        y = F.conv2d(x.float(), w, self._float_bias(), self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)
