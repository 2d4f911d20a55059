"""Which quantized module replaces a float module: keyed by float class, weight kind and input mode.

One float class can have several quantized twins: an affine weight (`QLinear`), a codebook weight
(product quantization), or an affine weight with quantized inputs (``w8a8``). A module registers
itself with `register`; `apply` and the loader look it up with `quantized_class`.
"""
from __future__ import annotations

import torch

INPUT_MODES = (None, "dynamic", "static")
# (float class, weight kind, input mode) -> quantized class
_REGISTRY: dict[tuple[type, str, str | None], type] = {}


def register(float_cls: type, kind: str, input_mode: str | None = None):
    """Class decorator: the quantized class for ``float_cls`` with ``kind`` weights."""
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, found {input_mode!r}")

    def deco(cls: type) -> type:
        key = (float_cls, kind, input_mode)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"{key} is already served by {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        return cls
    return deco


def quantized_class(module: torch.nn.Module, kind: str = "affine",
                    input_mode: str | None = None) -> type | None:
    """The registered class for ``module`` (its exact type), or None."""
    return _REGISTRY.get((type(module), kind, input_mode))


def class_by_name(name: str) -> type | None:
    return next((c for c in _REGISTRY.values() if c.__name__ == name), None)


def float_classes() -> tuple[type, ...]:
    """Float classes with at least one quantized twin."""
    return tuple(dict.fromkeys(k[0] for k in _REGISTRY))


def modes_for(float_cls: type, kind: str = "affine") -> tuple[str | None, ...]:
    return tuple(k[2] for k in _REGISTRY if k[0] is float_cls and k[1] == kind)
