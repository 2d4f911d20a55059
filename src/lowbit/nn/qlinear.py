"""`QLinear`: a weight-only quantized Linear with CPU fast paths (see `lowbit.kernels.cpu`)."""
from __future__ import annotations

import torch

from ..kernels import cpu
from ..primitives import QuantizedWeight
from .base import QuantizedModule


class QLinear(QuantizedModule):
    """y = x @ dequant(W)^T + b, computed by the path `kernels.cpu.choose_path` picks per call.

    The kernel forms of the weight (int4-packed, int8) are derived at construction, not stored in
    files; they are buffers that stay out of the state dict.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, method: str = "rtn",
                 sqnr_db: float | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self._set_weight(qw, method, sqnr_db)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.force_path: str | None = None
        self._build_runtime(qw)

    def _build_runtime(self, qw: QuantizedWeight) -> None:
        self._kind = cpu.kernel_kind(qw)
        self._max_rows = cpu.max_rows(self._kind, qw.rows * qw.cols)
        if self._kind == "int4":
            packed, sz = cpu.prepare_int4(qw)
            self.register_buffer("_k_weight", packed, persistent=False)
            self.register_buffer("_k_scales", sz, persistent=False)
        elif self._kind == "int8":
            w8, s8 = cpu.prepare_int8(qw)
            self.register_buffer("_k_weight", w8, persistent=False)
            self.register_buffer("_k_scales", s8, persistent=False)
        if self._kind is not None:
            scale, offset = cpu.f32_params(qw)
            self.register_buffer("_f32_scale", scale, persistent=False)
            self.register_buffer("_f32_offset", offset, persistent=False)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None) -> "QLinear":
        return cls(qw, linear.bias, method, sqnr_db)

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
        if path == "int4mm":
            y = cpu.int4_linear(x2d, self._k_weight, self.spec.group_size, self._k_scales)
        elif path == "int8mm":
            y = cpu.int8_linear(x2d, self._k_weight, self._k_scales)
        if path in ("int4mm", "int8mm"):
            y = y.float() if self.bias is None else torch.add(self.bias, y)  # promotes bf16 -> fp32
        elif path == "f32":
            y = cpu.f32_linear(x2d, self.qweight, self._f32_scale, self._f32_offset, self.bias)
        else:
            y = cpu.ref_linear(x2d, self.qweight, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
