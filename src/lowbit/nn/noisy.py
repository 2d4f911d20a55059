"""Linear, Conv2d and Embedding with Quant-Noise in training (Fan, Stock et al. 2020, arXiv
2004.07320). Each is a subclass of the float class holding the very same Parameters (so the
state dict, its keys and the optimizer's references are unchanged); `forward` computes a noisy
weight out of place (`algorithms.quant_noise`) while ``training`` and passes it to the functional
op. ``module.eval()`` runs the plain float layer. Built and removed by `lowbit.noise` via `apply.swap_modules`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..algorithms.quant_noise import block_noise, scalar_noise
from ..spec import QuantSpec

_OWN = ("_parameters", "_buffers", "_modules")  # dicts copied, so the two modules stay separate


def share_state(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A ``cls`` module with ``module``'s attributes and the same Parameter/buffer objects (new
    dicts; hooks are carried by `swap_modules`)."""
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    for key, value in module.__dict__.items():
        if key in _OWN:
            setattr(new, key, dict(value))
        elif not key.startswith("_") or key == "_non_persistent_buffers_set":
            new.__dict__[key] = value
    new.__dict__.pop("noise", None)
    return new


class NoiseSettings:
    """p, the scalar grid (``spec``) or ``block_size`` for block noise, and the generator."""

    def __init__(self, p: float, spec: QuantSpec | None, block_size: int | None,
                 generator: torch.Generator, name: str) -> None:
        self.p, self.spec, self.block_size = p, spec, block_size
        self.generator, self.name = generator, name

    def __repr__(self) -> str:
        form = f"block_size={self.block_size}" if self.block_size else f"scheme={self.spec.name}"
        return f"p={self.p}, {form}"


class _Noisy:
    noise: NoiseSettings

    def noisy_weight(self) -> torch.Tensor:
        w, n = self.weight, self.noise
        if not self.training or n.p == 0:
            return w
        if n.block_size:
            return block_noise(w, n.p, n.block_size, n.generator, n.name)
        return scalar_noise(w, n.spec, n.p, n.generator, n.name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_noise({self.noise!r})"


class NoisyLinear(_Noisy, torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.noisy_weight(), self.bias)


class NoisyConv2d(_Noisy, torch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.noisy_weight(), self.bias)


class NoisyEmbedding(_Noisy, torch.nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.noisy_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


NOISY_TABLE = {torch.nn.Linear: NoisyLinear, torch.nn.Conv2d: NoisyConv2d,
               torch.nn.Embedding: NoisyEmbedding}
FLOAT_OF = {v: k for k, v in NOISY_TABLE.items()}
