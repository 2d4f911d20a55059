"""`QLinearA8` and `QConv2dA8`: int8 weights with int8 inputs (``w8a8``, ``w8a8-static``).

Dynamic (``w8a8``): each input row (token) is quantized on the fly to uint8 with its own range,
multiplied with the int8 weight in exact int32 (`kernels.int8_dynamic`), and the zero point is
corrected in the epilogue. At few rows the weight-only int8 kernel (bf16 inputs, no input
quantization, so at least as accurate) may be faster on a CPU; which one runs is decided per row
bucket by `kernels.select` timing both on this host. Static (``w8a8-static``): one input grid per
layer, fixed by calibration (`primitives.tokens.static_input_params`), saved in the file header.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import QuantizationError
from ..kernels import cpu
from ..kernels.int8_conv import (codes_from_prepared_conv, conv_available, prepare_w8a8_conv,
                                 w8a8_static_conv2d)
from ..kernels.int8_dynamic import prepare_w8a8, w8a8_linear, w8a8_static_linear
from ..primitives import QuantizedWeight
from ..spec import ActSpec, QuantSpec
from .base import QuantizedModule
from .qconv import take_conv_geometry
from .registry import register
from .selection import choose_path, timing_input


def a8_unsupported(spec: QuantSpec) -> str | None:
    if not (spec.bits == 8 and spec.symmetric and spec.granularity == "channel"):
        return (f"int8 inputs need 8-bit symmetric per-channel weights (w8), found {spec.name}; "
                "use w8a8 / w8a8-static")
    return None


class _A8Mixin:
    def _init_input(self, input_spec: ActSpec | None, input_params: dict | None, name: str) -> None:
        if input_spec is None:
            raise QuantizationError(f"{name}: an int8-input layer needs an input spec")
        if input_spec.static:
            if not input_params or not all(isinstance(input_params.get(k), (int, float))
                                           for k in ("scale", "zero_point")):
                raise QuantizationError(f"{name}: static int8 inputs need calibrated "
                                        f"{{'scale', 'zero_point'}}, found {input_params!r}")
            if not input_params["scale"] > 0 or not 0 <= input_params["zero_point"] <= 255:
                raise QuantizationError(f"{name}: bad static input parameters {input_params!r}")
        self.input_params = dict(input_params) if input_spec.static else None

    def layer_meta(self) -> dict[str, Any]:
        return {**super().layer_meta(), "input_params": self.input_params}


@register(torch.nn.Linear, "affine", "dynamic")
@register(torch.nn.Linear, "affine", "static")
class QLinearA8(_A8Mixin, QuantizedModule):
    """y = dequant(quant(x)) @ dequant(W)^T + b with int8 x int8 -> int32 products."""

    unsupported = staticmethod(lambda module, spec: a8_unsupported(spec))

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, method: str = "rtn",
                 sqnr_db: float | None = None, input_spec: ActSpec | None = None,
                 input_params: dict | None = None, input_smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        why = a8_unsupported(qw.spec)
        if why:
            raise QuantizationError(why)
        self.out_features, self.in_features = qw.shape
        self._set_weight(qw, method, sqnr_db, input_spec)
        self._init_input(input_spec, input_params, "QLinearA8")
        self._init_smooth(input_smooth)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.force_path: str | None = None
        self.rebuild()

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None,
                   input_params: dict | None = None,
                   input_smooth: torch.Tensor | None = None) -> "QLinearA8":
        return cls(qw, linear.bias, method, sqnr_db, input_spec, input_params, input_smooth)

    def _init_smooth(self, smooth: torch.Tensor | None) -> None:
        """SmoothQuant at run time (Xiao et al., ICML 2023) for a layer whose producer cannot take
        the factors (a post-LN norm that also feeds the residual): the weight was quantized as
        ``W * s`` (columns) and the input is divided by ``s`` before its int8 grids. ``s`` is the
        buffer ``smooth`` (in_features,) float32, saved with the float tensors; the header says
        ``"input_smooth": true``. Static inputs: the calibrated grid is that of ``x / s``
        (`calibrate.collect(input_scale=...)`). One more pass over the input either way (for
        static inputs it could be folded into the grid's division; not done yet)."""
        if smooth is not None:
            smooth = torch.as_tensor(smooth).detach().float().reshape(-1).contiguous()
            positive = smooth.is_meta or bool((smooth > 0).all())  # meta: a loader's skeleton
            if smooth.numel() != self.in_features or not positive:
                raise QuantizationError(f"QLinearA8: input smoothing factors must be "
                                        f"{self.in_features} positive floats, found "
                                        f"{tuple(smooth.shape)} (min {float(smooth.min()):.3g})")
        self.register_buffer("smooth", smooth)

    def layer_meta(self) -> dict[str, Any]:
        return {**super().layer_meta(), **({"input_smooth": True} if self.smooth is not None else {})}

    def _apply(self, fn, recurse=True):
        """As `QuantizedModule._apply`; the smoothing factors, like the codes, keep float32 through
        a cast (the weight was quantized with them)."""
        smooth = self._buffers.get("smooth")
        super()._apply(fn, recurse)
        if smooth is not None and self._buffers["smooth"].dtype != smooth.dtype:
            self._buffers["smooth"] = smooth.to(self._buffers["smooth"].device)
            self.rebuild()
        return self

    def _derive(self) -> None:
        """The kernel's int8 weight (``q - 128``, `kernels.layout` "int8") is the one kept copy of
        the codes; saving derives the file's uint8 codes from it."""
        smooth = getattr(self, "smooth", None)
        self._inv_smooth = None if smooth is None else smooth.float().reciprocal()
        qw = self.qweight  # file layout (derived from the kept one after a cast or move)
        self._prepared = prepare_w8a8(qw.qdata, qw.scale)
        self._keep_codes(self._prepared["weight"], "int8")
        self._int8mm = cpu.int8_supported(qw) and not self.input_spec.static
        self._k_scales = cpu.prepare_int8(qw)[1] if self._int8mm else None
        self._paths: dict[str, str] = {}

    def _derive_none(self) -> None:
        self._prepared, self._int8mm, self._k_scales, self._paths = None, False, None, {}
        self._inv_smooth = None

    def candidates(self) -> dict[str, Any]:
        """Paths this layer can take, as callables of a row count (for timing)."""
        x = timing_input(self.in_features)
        if self.input_spec.static:
            p = self.input_params
            out = {"w8a8-static": lambda m: w8a8_static_linear(self._smoothed(x(m)), self._prepared,
                                                                p["scale"], p["zero_point"])}
        else:
            out = {"w8a8": lambda m: w8a8_linear(x(m), self._prepared, None, self._inv_smooth)}
        if self._int8mm:
            out["int8mm"] = lambda m: cpu.int8_linear(self._smoothed(x(m)), self._prepared["weight"],
                                                      self._k_scales)
        return out

    def path_for(self, rows: int) -> str:
        if self.force_path:
            return self.force_path
        return choose_path(self, rows)

    def set_path(self, path: str | None) -> None:
        if path is not None and path not in self.candidates():
            raise ValueError(f"path {path!r} is not available here; paths: {sorted(self.candidates())}")
        self.force_path = path

    def _smoothed(self, x2d: torch.Tensor) -> torch.Tensor:
        return x2d if self._inv_smooth is None else x2d.float() * self._inv_smooth  # (M, K) * (K,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no gradient flows through int8 codes; detached, the in-place epilogue also runs outside
        # torch.no_grad() on inputs that require grad (a float embedding upstream)
        x2d = x.reshape(-1, self.in_features).detach()
        bias = self._float_bias()
        path = self.path_for(x2d.shape[0]) if x2d.shape[0] else "w8a8"
        if path == "int8mm":
            y = cpu.int8_linear(self._smoothed(x2d), self._prepared["weight"], self._k_scales).float()
            y = y if bias is None else y.add_(bias)
        elif self.input_spec.static:
            p = self.input_params
            y = w8a8_static_linear(self._smoothed(x2d.float()), self._prepared, p["scale"],
                                   p["zero_point"], bias)
        else:
            y = w8a8_linear(x2d.float().contiguous(), self._prepared, bias, self._inv_smooth)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@register(torch.nn.Conv2d, "affine", "static")
class QConv2dA8(_A8Mixin, QuantizedModule):
    """Static w8a8 Conv2d through the oneDNN int8 convolution torch ships for x86."""

    @staticmethod
    def unsupported(module: torch.nn.Module, spec: QuantSpec) -> str | None:
        if not conv_available():
            return "this torch build has no oneDNN int8 convolution"
        return a8_unsupported(spec)

    def __init__(self, qw: QuantizedWeight, conv: torch.nn.Conv2d, method: str = "rtn",
                 sqnr_db: float | None = None, input_spec: ActSpec | None = None,
                 input_params: dict | None = None) -> None:
        super().__init__()
        why = self.unsupported(conv, qw.spec)
        if why:
            raise QuantizationError(why)
        self._set_weight(qw, method, sqnr_db, input_spec)
        self._init_input(input_spec, input_params, "QConv2dA8")
        take_conv_geometry(self, conv)
        self.rebuild()

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None,
                   input_params: dict | None = None) -> "QConv2dA8":
        return cls(qw, conv, method, sqnr_db, input_spec, input_params)

    def _derive(self) -> None:
        """One copy of the codes: the oneDNN-packed int8 weight (an opaque tensor, no storage a
        buffer could share) is built from the file-layout codes, which are then dropped: the
        ``qdata`` buffer becomes an empty placeholder (layout ``"onednn"``) and the file layout
        is derived from the packed weight when saved (`codes_from_prepared_conv`: exact). A
        rebuild after a cast or move keeps the packed form as it is (CPU only)."""
        if self.layout == "onednn":
            if getattr(self, "_prepared", None) is None:
                raise QuantizationError("QConv2dA8: the packed weight is gone (moved to the meta "
                                        "device?); load the layer again")
            return
        p = self.input_params
        self._prepared = prepare_w8a8_conv(self.qdata, self.scale, self.weight_shape, p["scale"],
                                           int(p["zero_point"]), self.stride, self.padding,
                                           self.dilation, self.groups)
        self._keep_codes(torch.empty(0, dtype=torch.uint8, device=self.qdata.device), "onednn")

    def _derive_none(self) -> None:
        self._prepared = None

    def __deepcopy__(self, memo: dict) -> "QConv2dA8":
        """A copy rebuilt from the file-layout codes: the packed weight is an opaque tensor that
        ``copy.deepcopy`` cannot copy (no storage), so the copy packs its own."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_prepared":
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._prepared = None
        if self.layout == "onednn" and self._prepared is not None:
            new._keep_codes(self.file_qdata(), "file")
        new.rebuild()
        return new

    def file_qdata(self) -> torch.Tensor:
        if self.layout == "onednn":
            return codes_from_prepared_conv(self._prepared)
        return super().file_qdata()

    def _params_qweight(self) -> QuantizedWeight:
        """Meta and byte count from a meta tensor of the file layout's shape (the buffer is a
        placeholder while the packed weight holds the codes)."""
        if self.layout != "onednn":
            return super()._params_qweight()
        qdata = torch.empty(self._file_qdata_shape(), dtype=torch.uint8, device="meta")
        return QuantizedWeight(qdata, self.scale, self.zero_point, self.spec, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_static_conv2d(x.float(), self._prepared, self._float_bias()).to(x.dtype)
