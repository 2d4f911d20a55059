"""Quant-Noise (Fan, Stock et al., "Training with Quantization Noise for Extreme Model
Compression", arXiv 2004.07320) as pure functions on a weight.

At each training step only a random proportion ``p`` of the weight is quantized (scalar noise) or,
for product quantization, random blocks are dropped and the rest rescaled (block noise, the
paper's proxy for iPQ, as in its fairseq reference). Both are out of place: they return a new
tensor computed in forward and never write the input (fairseq's hook overwrote ``weight.data``).
The weight is handled as the 2-D view ``(rows, cols)`` of `primitives.affine.as_2d`: a Linear
``(out, in)``, a Conv2d ``(out, in_channels*kh*kw)`` (the paper's convention), an Embedding
``(num, dim)``.
"""
from __future__ import annotations

import torch

from ..primitives.affine import as_2d
from ..spec import QuantSpec
from .fake_quant import fake_quantize_ste
from ..errors import LowbitError


class QuantNoiseError(LowbitError):
    """A noise setting that cannot apply to a weight; the message names the weight."""


def _check_p(p: float, name: str) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise QuantNoiseError(f"{name}: noise proportion p must be in [0, 1), found {p!r}")


def scalar_noise(weight: torch.Tensor, spec: QuantSpec, p: float,
                 generator: torch.Generator, name: str = "weight") -> torch.Tensor:
    """A random proportion ``p`` of the weights replaced by their fake-quantized values under
    ``spec`` (parameters from the whole weight, as post-training quantization would pick them);
    gradients pass straight through (`fake_quant.fake_quantize_ste`)."""
    _check_p(p, name)
    if p == 0.0:
        return weight.clone()
    mask = torch.rand(weight.shape, generator=generator, device=weight.device) < p
    return torch.where(mask, fake_quantize_ste(weight, spec, name=name), weight)


def block_mask(shape2d: tuple[int, int], p: float, block_size: int, generator: torch.Generator,
               name: str = "weight") -> torch.Tensor:
    """Boolean keep-mask (rows, cols): each block of ``block_size`` consecutive columns of a row is
    dropped with probability ``p``."""
    rows, cols = shape2d
    if not isinstance(block_size, int) or block_size < 1:
        raise QuantNoiseError(f"{name}: block_size must be a positive integer, found {block_size!r}")
    if cols % block_size:
        raise QuantNoiseError(
            f"{name}: block_size {block_size} does not divide the {cols} input features "
            f"(Linear: in_features; Conv2d: in_channels*kh*kw; Embedding: embedding_dim); "
            f"valid block sizes: {[d for d in range(1, min(cols, 64) + 1) if cols % d == 0]}")
    drop = torch.rand(rows, cols // block_size, generator=generator) < p  # (rows, n_blocks)
    return (~drop).repeat_interleave(block_size, dim=1)  # (rows, cols)


def block_noise(weight: torch.Tensor, p: float, block_size: int, generator: torch.Generator,
                name: str = "weight") -> torch.Tensor:
    """Random blocks of ``block_size`` consecutive input features dropped with probability ``p``,
    the kept weights rescaled by ``1 / (1 - p)`` (dropout on blocks). Gradient: the same mask and
    factor."""
    _check_p(p, name)
    w2d = as_2d(weight)  # (rows, cols)
    keep = block_mask(tuple(w2d.shape), p, block_size, generator, name).to(weight.device)
    if p == 0.0:
        return weight.clone()
    out = w2d * keep.to(weight.dtype) / (1.0 - p)  # (rows, cols)
    return out.reshape(weight.shape)
