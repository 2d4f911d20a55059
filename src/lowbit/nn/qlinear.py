"""`QLinear`: a weight-only quantized Linear with CPU fast paths (see `lowbit.kernels.cpu`)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..kernels import bf16, cpu
from ..primitives import QuantizedWeight
from ..spec import ActSpec
from .base import QuantizedModule
from .registry import register
from .selection import choose_path, timing_input


@register(torch.nn.Linear, "affine")
class QLinear(QuantizedModule):
    """y = x @ dequant(W)^T + b, computed by the path measured fastest on this host for the number
    of input rows (`nn.selection`); ``set_path`` pins one.

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
        self.selector = None
        self.rebuild()

    def _derive(self) -> None:
        qw = self.qweight
        self._available = cpu.available_paths(qw)
        self._k_weight = self._k_scales = None
        if "int4mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int4(qw)
        elif "int8mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int8(qw)
        self._f32_scale, self._f32_offset = cpu.f32_params(qw)
        self._paths: dict[str, str] = {}

    def _derive_none(self) -> None:
        self._available, self._paths = ("ref",), {}
        self._k_weight = self._k_scales = self._f32_scale = self._f32_offset = None

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> "QLinear":
        return cls(qw, linear.bias, method, sqnr_db, input_spec)

    def set_path(self, path: str | None) -> None:
        """Pin the compute path (one of kernels.cpu.PATHS this weight supports), or None to choose
        per call."""
        if path is not None and (path not in cpu.PATHS or not cpu.path_supported(self.qweight, path)):
            raise ValueError(f"path {path!r} is not available for a {self.spec.name} weight of shape "
                             f"{self.weight_shape}; paths here: {self._available}")
        self.force_path = path

    def path_for(self, rows: int) -> str:
        if self.force_path:
            return self.force_path
        return choose_path(self, rows) if rows else self._available[-1]

    def candidates(self) -> dict[str, Callable[[int], Any]]:
        """The available paths as callables of a row count (what the selector times)."""
        x = timing_input(self.in_features)
        return {p: (lambda m, p=p: self._run(p, x(m), None)) for p in self._available}

    def _run(self, path: str, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if path == "int4mm":
            y = cpu.int4_linear(x2d, self._k_weight, self.spec.group_size, self._k_scales)
        elif path == "int8mm":
            y = cpu.int8_linear(x2d, self._k_weight, self._k_scales)
        elif path == "bf16":
            return bf16.bf16_linear(x2d, self.qweight, self._f32_scale, self._f32_offset, bias)
        elif path == "f32":
            return cpu.f32_linear(x2d, self.qweight, self._f32_scale, self._f32_offset, bias)
        else:
            return cpu.ref_linear(x2d, self.qweight, bias)
        return y.float() if bias is None else torch.add(bias, y)  # promotes bf16 -> fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self._run(self.path_for(x2d.shape[0]), x2d, self._float_bias())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
