"""Fake-quantized twins of Linear, Conv2d and Embedding for quantization-aware training.

Each holds the float module's own ``weight`` (and ``bias``) Parameters, not copies, and quantizes
the weight functionally in forward (`algorithms.fake_quant`): the stored weight is only ever
changed by the user's optimizer, never by lowbit (no ``.data`` writes). Quantization parameters:

- default: recomputed from the current weight at every call by the spec's range method (a
  min-max observer that follows the weight), straight-through gradient;
- ``freeze_ranges()``: the current parameters stored as buffers ``scale`` / ``zero_point`` and
  used from then on (the observer frozen after a step the trainer picks);
- ``learn_scale=True``: LSQ (Esser et al., arXiv 1902.08153), a learned Parameter ``step``
  (R, G) initialised from the primitives' range choice; the zero point is a fixed buffer.

``quantized_weight()`` gives the `QuantizedWeight` that `qat.convert` builds the quantized layer
from: its dequantization equals the last fake-quant forward bit for bit. ``to_float()`` gives back
a plain module holding the same Parameters (removal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..algorithms.fake_quant import (fake_quantize_ste, init_step, lsq_fake_quantize, qparams,
                                     quantize_with_params, stored_step)
from ..primitives import QuantizedWeight, quantize_weight
from ..spec import QuantSpec, parse_scheme


class FakeQuantModule(torch.nn.Module):
    """Shared state and the fake-quantized weight."""

    def _init_fake(self, float_module: torch.nn.Module, spec: "QuantSpec | str",
                   learn_scale: bool, name: str) -> None:
        self.spec = parse_scheme(spec)
        self.learn_scale = learn_scale
        self.layer_name = name
        self.weight = float_module.weight
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_parameter("step", None)
        if learn_scale:
            step, zp = init_step(self.weight, self.spec, name)
            self.step = torch.nn.Parameter(step)
            self._set_zero_point(zp)

    def _set_zero_point(self, zp: torch.Tensor | None) -> None:
        if zp is not None:
            self.register_buffer("zero_point", zp.clone())

    @property
    def ranges_frozen(self) -> bool:
        return self.scale is not None

    def freeze_ranges(self) -> None:
        """Keep the current quantization parameters from now on (no-op under LSQ, whose step is
        learned)."""
        if self.learn_scale or self.ranges_frozen:
            return
        scale, zp = qparams(self.weight, self.spec, self.layer_name)
        self.register_buffer("scale", scale)
        self._set_zero_point(zp)

    def fake_weight(self) -> torch.Tensor:
        """The weight as the quantized layer will see it, with STE / LSQ gradients."""
        if self.learn_scale:
            return lsq_fake_quantize(self.weight, self.step, self.spec, self.zero_point,
                                     name=self.layer_name)
        return fake_quantize_ste(self.weight, self.spec, self.scale, self.zero_point,
                                 self.layer_name)

    def quantized_weight(self) -> QuantizedWeight:
        """What post-training quantization makes for the current weight and parameters."""
        if self.learn_scale:
            return quantize_with_params(self.weight, self.spec, stored_step(self.step, self.spec),
                                        self.zero_point, self.layer_name)
        if self.ranges_frozen:
            return quantize_with_params(self.weight, self.spec, self.scale, self.zero_point,
                                        self.layer_name)
        return quantize_weight(self.weight, self.spec, self.layer_name)

    def extra_repr(self) -> str:
        mode = "lsq" if self.learn_scale else "frozen" if self.ranges_frozen else "observer"
        return f"shape={tuple(self.weight.shape)}, scheme={self.spec.name}, ranges={mode}"


class FakeQuantLinear(FakeQuantModule):
    def __init__(self, linear: torch.nn.Linear, spec: "QuantSpec | str", learn_scale: bool = False,
                 name: str = "weight") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_fake(linear, spec, learn_scale, name)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight(), self.bias)

    def to_float(self) -> torch.nn.Linear:
        out = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


class FakeQuantConv2d(FakeQuantModule):
    _ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode")

    def __init__(self, conv: torch.nn.Conv2d, spec: "QuantSpec | str", learn_scale: bool = False,
                 name: str = "weight") -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: FakeQuantConv2d supports padding_mode='zeros' only, "
                             f"found {conv.padding_mode!r}")
        for a in self._ATTRS:
            setattr(self, a, getattr(conv, a))
        self._init_fake(conv, spec, learn_scale, name)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.fake_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def to_float(self) -> torch.nn.Conv2d:
        out = torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                              self.padding, self.dilation, self.groups, self.bias is not None,
                              device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


class FakeQuantEmbedding(FakeQuantModule):
    def __init__(self, emb: torch.nn.Embedding, spec: "QuantSpec | str", learn_scale: bool = False,
                 name: str = "weight") -> None:
        super().__init__()
        if emb.max_norm is not None or emb.sparse:
            raise ValueError(f"{name}: FakeQuantEmbedding does not support max_norm (it renormalises "
                             f"the stored weight in place) or sparse=True; found max_norm="
                             f"{emb.max_norm!r}, sparse={emb.sparse!r}")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.scale_grad_by_freq = emb.padding_idx, emb.scale_grad_by_freq
        self._init_fake(emb, spec, learn_scale, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.fake_weight(), self.padding_idx,
                           scale_grad_by_freq=self.scale_grad_by_freq)

    def to_float(self) -> torch.nn.Embedding:
        out = torch.nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                                 scale_grad_by_freq=self.scale_grad_by_freq, device="meta")
        out.weight = self.weight
        return out


FAKE_QUANT_TABLE = {torch.nn.Linear: FakeQuantLinear, torch.nn.Conv2d: FakeQuantConv2d,
                    torch.nn.Embedding: FakeQuantEmbedding}
