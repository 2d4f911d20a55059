"""`QLinear`: a weight-only quantized Linear with CPU fast paths (see `lowbit.kernels.cpu`)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..kernels import bf16, cpu, layout
from ..primitives import QuantizedWeight
from ..spec import ActSpec
from .base import QuantizedModule
from .registry import register
from .selection import choose_path, timing_input


@register(torch.nn.Linear, "affine")
class QLinear(QuantizedModule):
    """y = x @ dequant(W)^T + b, computed by the path measured fastest on this host for the number
    of input rows (`nn.selection`); ``set_path`` pins one.

    One copy of the codes (`kernels.layout`), kept in the layout of the layer's packed kernel:
    the int4 pack when ``int4mm`` is available, else the int8 form when ``int8mm`` is, else the
    file layout. The ``bf16`` and ``f32`` paths read the kept layout directly; ``ref`` and saving
    derive the file layout. Besides the codes the layer keeps its file-form scale and zero point
    (fp16 scales do not convert exactly to the kernels' bf16) and, as derived state rebuilt by
    `rebuild`, the kernel's bf16 scales (int4mm: 4 bytes per group; int8mm: 2 per row) and, for
    one scale per row only, the fp32 scale and offset of the dequantizing paths (per group they
    are computed per call: 8 bytes per group would be 12% of a w4g128 layer).
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
        qw = self.qweight  # file layout (derived from the kept one after a cast or move)
        self._available = cpu.available_paths(qw)
        self._k_weight = self._k_scales = self._f32 = None
        if "int4mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int4(qw)
            if layout.keep_int4pack(self._k_weight, qw.qdata, self.codes.shape):
                self._keep_codes(self._k_weight, "int4pack")
        elif "int8mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int8(qw)
            self._keep_codes(self._k_weight, "int8")
        self._f32 = self._f32_params() if self.scale.shape[-1] == 1 else None  # per row: cache
        self._paths: dict[str, str] = {}

    def _derive_none(self) -> None:
        self._available, self._paths = ("ref",), {}
        self._k_weight = self._k_scales = self._f32 = None

    def _f32_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 scale and offset of the dequantizing paths; no offset where the int8 layout gives
        the same floats without it (`cpu.offset_free`: one pass less)."""
        if getattr(self, "_f32", None) is not None:
            return self._f32
        if self.layout == "int8" and cpu.offset_free(self.spec):
            return self.scale.float(), None
        return cpu.f32_params_of(self.scale, self.zero_point, self.spec)

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
            return bf16.bf16_linear(x2d, self.codes, *self._f32_params(), bias)
        elif path == "f32":
            return cpu.f32_linear(x2d, self.codes, *self._f32_params(), bias)
        else:
            return cpu.ref_linear(x2d, self.qweight, bias)
        return y.float() if bias is None else torch.add(bias, y)  # promotes bf16 -> fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self._run(self.path_for(x2d.shape[0]), x2d, self._float_bias())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
