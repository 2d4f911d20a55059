"""`QLinear`: a weight-only quantized Linear with CPU fast paths (see `lowbit.kernels.cpu`)."""
from __future__ import annotations

import torch

from ..kernels import cpu
from ..primitives import QuantizedWeight
from ..spec import ActSpec
from .base import QuantizedModule
from .registry import register


@register(torch.nn.Linear, "affine")
class QLinear(QuantizedModule):
    """y = x @ dequant(W)^T + b, computed by the path `kernels.cpu.path_for_rows` picks per call.

    The kernel forms of the weight (int4-packed, int8) are derived state: plain attributes built by
    `rebuild` (never buffers, never in files), rebuilt whenever the stored tensors change.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, method: str = "rtn",
                 sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self._set_weight(qw, method, sqnr_db, input_spec)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.force_path: str | None = None
        self.rebuild()

    def _derive(self) -> None:
        qw = self.qweight
        self._kind = cpu.kernel_kind(qw)
        self._max_rows = cpu.max_rows(self._kind, qw.rows * qw.cols)
        self._k_weight = self._k_scales = None
        if self._kind == "int4":
            self._k_weight, self._k_scales = cpu.prepare_int4(qw)
        elif self._kind == "int8":
            self._k_weight, self._k_scales = cpu.prepare_int8(qw)
        self._f32_scale, self._f32_offset = cpu.f32_params(qw) if self._kind else (None, None)

    def _derive_none(self) -> None:
        self._kind, self._max_rows = None, 0
        self._k_weight = self._k_scales = self._f32_scale = self._f32_offset = None

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> "QLinear":
        return cls(qw, linear.bias, method, sqnr_db, input_spec)

    def set_path(self, path: str | None) -> None:
        """Pin the compute path (one of kernels.cpu.PATHS), or None to choose per call."""
        if path is not None and (path not in cpu.PATHS or not cpu.path_supported(self.qweight, path)):
            raise ValueError(f"path {path!r} is not available for a {self.spec.name} weight of shape "
                             f"{self.weight_shape}; paths: {cpu.PATHS}")
        self.force_path = path

    def path_for(self, rows: int) -> str:
        return self.force_path or cpu.path_for_rows(self._kind, self._max_rows, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        path = self.path_for(x2d.shape[0])
        bias = self._float_bias()
        if path == "int4mm":
            y = cpu.int4_linear(x2d, self._k_weight, self.spec.group_size, self._k_scales)
        elif path == "int8mm":
            y = cpu.int8_linear(x2d, self._k_weight, self._k_scales)
        if path in ("int4mm", "int8mm"):
            y = y.float() if bias is None else torch.add(bias, y)  # promotes bf16 -> fp32
        elif path == "f32":
            y = cpu.f32_linear(x2d, self.qweight, self._f32_scale, self._f32_offset, bias)
        else:
            y = cpu.ref_linear(x2d, self.qweight, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
