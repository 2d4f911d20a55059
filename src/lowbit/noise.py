"""`quant_noise`: train with Quant-Noise (Fan, Stock et al. 2020, arXiv 2004.07320) so the model
survives the quantization applied afterwards.

    handle = lowbit.quant_noise(model, p=0.1)                  # scalar: p of the weights fake-quantized (w8)
    handle = lowbit.quant_noise(model, p=0.05, block_size=8)   # block noise for iPQ
    train(model); handle.remove()                              # or lowbit.quant_noise(model, p=0)

The noise is computed in forward from the stored weight (never written), only in ``train()``
mode; the state dict keeps its keys and values (`nn.noisy`). Layers change only through
`apply.swap_modules`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .algorithms.ipq import matches
from .algorithms.quant_noise import QuantNoiseError, _check_p, block_mask
from .apply import swap_modules
from .nn.noisy import FLOAT_OF, NOISY_TABLE, NoiseSettings, share_state
from .primitives.affine import as_2d
from .spec import QuantSpec, parse_scheme

DEFAULT_TARGETS = ("Linear", "Conv2d", "Embedding")


@dataclass
class QuantNoiseHandle:
    """The layers given noise; `remove` gives them back as plain float layers."""
    model: torch.nn.Module
    layers: list[str] = field(default_factory=list)

    def remove(self) -> None:
        remove_quant_noise(self.model)
        self.layers = []


def quant_noise(model: torch.nn.Module, p: float = 0.1, scheme: "str | QuantSpec" = "w8",
                block_size: int | None = None, targets: Sequence[str] | None = None,
                ignore: Sequence[str] = (), seed: int = 0) -> QuantNoiseHandle:
    """Give the Linear/Conv2d/Embedding layers matching ``targets`` (default: all) Quant-Noise of
    proportion ``p``: scalar (a random ``p`` of the weights fake-quantized under ``scheme``) or,
    with ``block_size``, block noise (random blocks of ``block_size`` inputs dropped, the rest
    scaled by 1/(1-p)). Replaces earlier noise; ``p=0`` only removes it. The k-th noisy layer
    draws from ``torch.Generator().manual_seed(seed + k)``."""
    if not isinstance(model, torch.nn.Module):
        raise QuantNoiseError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    _check_p(p, "quant_noise")
    spec = parse_scheme(scheme)
    remove_quant_noise(model)
    if p == 0:
        return QuantNoiseHandle(model)
    chosen = _chosen(model, tuple(targets or DEFAULT_TARGETS), tuple(ignore))
    new = {}
    for k, (name, module) in enumerate(chosen):
        if block_size is not None:
            block_mask(tuple(as_2d(module.weight.detach()).shape), 0.0, block_size,
                       torch.Generator(), name)  # raises when block_size does not divide
        noisy = share_state(module, NOISY_TABLE[type(module)])
        noisy.noise = NoiseSettings(float(p), spec, block_size,
                                    torch.Generator().manual_seed(seed + k), name)
        new[name] = noisy
    swap_modules(model, new)
    return QuantNoiseHandle(model, list(new))


def _chosen(model: torch.nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...]
            ) -> list[tuple[str, torch.nn.Module]]:
    out, seen = [], set()
    for name, m in model.named_modules():
        if type(m) in NOISY_TABLE and id(m) not in seen and name and \
                any(matches(t, name, m) for t in targets) and not any(matches(i, name, m) for i in ignore):
            seen.add(id(m))
            out.append((name, m))
    if not out:
        raise QuantNoiseError(f"quant_noise: targets {list(targets)} (ignore {list(ignore)}) match "
                              "no Linear, Conv2d or Embedding layer of this "
                              f"{type(model).__name__}")
    return out


def remove_quant_noise(model: torch.nn.Module) -> int:
    """Give every noisy layer back as its plain float class (same Parameters); returns how many."""
    back, seen = {}, set()
    for name, m in model.named_modules():
        if type(m) in FLOAT_OF and id(m) not in seen:
            seen.add(id(m))
            back[name] = share_state(m, FLOAT_OF[type(m)])
    if back:
        swap_modules(model, back)
    return len(back)


__all__ = ["QuantNoiseError", "QuantNoiseHandle", "quant_noise", "remove_quant_noise"]
