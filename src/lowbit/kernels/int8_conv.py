"""Static int8 Conv2d on x86 CPUs through oneDNN's ``onednn::qconv2d_pointwise``, on plain tensors.

torch 2.13 ships the kernel as an aten op that takes a plain uint8 activation tensor, a weight
prepacked from a plain int8 tensor (``onednn::qconv_prepack``) and plain float scales: no quantized
tensors (deprecated in 2.13) are involved. It accumulates uint8 x int8 products in int32 and
applies ``s_x * s_w[o] * (acc - z_x * sum w) + bias`` in its own epilogue, returning float32.

Weights: lowbit's 8-bit symmetric per-channel codes (uint8, implicit zero point 128) become int8
``q - 128`` of shape (out, in / groups, kh, kw). Activations: one scale and an **integer** zero
point for the whole tensor (from calibration), so that the zero padding of the float input is
exactly code ``z_x`` (the integer-zero-point rule of Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018); codes come from
`primitives.affine.quantize_codes` like every other lowbit rounding. Only ``padding_mode="zeros"``.
``ref_w8a8_static_conv2d`` is the plain-torch twin (float64 convolution of the dequantized sides).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8_dynamic import check_act_params, quantize_static


def conv_available() -> bool:
    """Whether this torch build has the oneDNN int8 convolution (x86 builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def check_conv_act_params(act_scale: float, act_zero_point: float) -> None:
    check_act_params(act_scale, act_zero_point)
    if float(act_zero_point) != int(act_zero_point) or not 0 <= int(act_zero_point) <= 255:
        raise ValueError(f"w8a8-static Conv2d: act_zero_point must be an integer in 0..255 (zero "
                         f"padding must be an exact code), found {act_zero_point!r}")


def prepare_w8a8_conv(codes: torch.Tensor, scale: torch.Tensor, weight_shape: tuple[int, ...],
                      act_scale: float, act_zero_point: int, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), groups: int = 1) -> dict:
    """Kernel form of a static w8a8 Conv2d: the oneDNN-packed int8 weight and its parameters.

    ``codes`` uint8 (out, in/groups*kh*kw) or ``weight_shape``; ``scale`` (out, 1) or (out,).
    """
    out_ch = weight_shape[0]
    if codes.dtype != torch.uint8 or codes.numel() != torch.Size(weight_shape).numel():
        raise ValueError(f"w8a8 Conv2d weight codes: expected uint8 with {tuple(weight_shape)} "
                         f"elements, found {tuple(codes.shape)} {codes.dtype}")
    if scale.numel() != out_ch:
        raise ValueError(f"w8a8 Conv2d weight scale: expected {out_ch} values (one per output "
                         f"channel), found {tuple(scale.shape)}")
    check_conv_act_params(act_scale, act_zero_point)
    w = (codes.to(torch.int16) - 128).to(torch.int8).reshape(weight_shape).contiguous()
    w_scale = scale.float().reshape(-1).contiguous()
    geometry = {"stride": list(stride), "padding": list(padding), "dilation": list(dilation),
                "groups": int(groups)}
    packed = torch.ops.onednn.qconv_prepack(w, w_scale, float(act_scale), int(act_zero_point),
                                            geometry["stride"], geometry["padding"],
                                            geometry["dilation"], geometry["groups"], None)
    return {"packed": packed, "scale": w_scale, "zero_points": torch.zeros(out_ch, dtype=torch.int64),
            "act_scale": float(act_scale), "act_zero_point": int(act_zero_point), **geometry}


def codes_from_prepared_conv(prepared: dict) -> torch.Tensor:
    """lowbit's uint8 codes (out, in/groups*kh*kw) back from the oneDNN-packed weight (its
    ``to_dense`` returns the int8 weight exactly), so a layer can hold the packed form alone."""
    w = prepared["packed"].to_dense()  # (out, in/groups, kh, kw) int8
    return (w.to(torch.int16) + 128).to(torch.uint8).reshape(w.shape[0], -1)


def w8a8_static_conv2d(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, out, H', W') from float (N, in, H, W) activations."""
    s, z = prepared["act_scale"], prepared["act_zero_point"]
    q = quantize_static(x.reshape(x.shape[0], -1), s, z).view(x.shape)  # (N, C*H*W) -> (N, C, H, W)
    return torch.ops.onednn.qconv2d_pointwise(
        q, s, z, prepared["packed"], prepared["scale"], prepared["zero_points"],
        None if bias is None else bias.float(), prepared["stride"], prepared["padding"],
        prepared["dilation"], prepared["groups"], 1.0, 0, torch.float32, "none", [], None)


def ref_w8a8_static_conv2d(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                           weight_shape: tuple[int, ...], act_scale: float, act_zero_point: int,
                           bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0),
                           dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """Reference twin: the same activation codes, both sides dequantized in float64, F.conv2d."""
    q = quantize_static(x.reshape(x.shape[0], -1), act_scale, act_zero_point).view(x.shape)
    x_hat = (q.double() - float(act_zero_point)) * float(act_scale)
    w_hat = (codes.double().reshape(weight_shape) - 128.0) * scale.double().reshape(-1, 1, 1, 1)
    y = F.conv2d(x_hat, w_hat, None if bias is None else bias.double(), stride, padding, dilation, groups)
    return y.float()
