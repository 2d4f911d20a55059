"""iPQ's per-layer pieces (Stock et al., "And the Bit Goes Down", arXiv 1907.05686), free of
orchestration: which stage a module belongs to, and the codebook of one layer's weight under its
stage's settings, seeded from the config alone. Staging, module swaps and centroid finetuning
live in the caller (`lowbit.ipq.quantize`).
"""
from __future__ import annotations

import re

import torch

from ..ipq_config import IPQConfig, LayerGroup
from ..primitives.codebook import CodebookWeight, quantize_codebook

# module types iPQ can quantize, and the columns their blocks split (the paper's convention)
BLOCK_AXIS = {torch.nn.Linear: "in_features", torch.nn.Conv2d: "in_channels*kh*kw",
              torch.nn.Embedding: "embedding_dim"}


def matches(pattern: str, name: str, module: torch.nn.Module) -> bool:
    """The recipes' target grammar: exact name | class name | ``re:<regex>`` on the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def group_of(config: IPQConfig, name: str, module: torch.nn.Module) -> int | None:
    """Index of the first stage whose targets match ``module`` (and whose ignores do not): a layer
    is quantized once, in the earliest stage that claims it; None when no stage does."""
    for i, g in enumerate(config.groups):
        if any(matches(t, name, module) for t in g.targets) and \
                not any(matches(t, name, module) for t in g.ignore):
            return i
    return None


def unsupported_reason(module: torch.nn.Module, group: LayerGroup) -> str | None:
    """Why ``module`` cannot take ``group``'s codebook, or None if it can."""
    axis = BLOCK_AXIS.get(type(module))
    if axis is None:
        return (f"unsupported module type {type(module).__name__}; supported: "
                + ", ".join(c.__name__ for c in BLOCK_AXIS))
    w = module.weight
    cols = w[0].numel() if w.dim() > 1 else w.numel()
    if cols % group.block_size:
        return f"block_size {group.block_size} does not divide {axis} = {cols}"
    if isinstance(module, torch.nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} (only 'zeros')"
    return None


def quantize_layer(weight: torch.Tensor, config: IPQConfig, stage: int, layer: int,
                   name: str = "weight") -> CodebookWeight:
    """The codebook of one weight under stage ``stage``'s settings; ``layer`` is its index in
    module order within the stage, so the k-means seed (`IPQConfig.layer_seed`) depends only on
    the config and the layer's place."""
    g = config.groups[stage]
    gen = torch.Generator().manual_seed(config.layer_seed(stage, layer))
    return quantize_codebook(weight, g.n_centroids, g.block_size, gen, config.n_iter, config.init,
                             config.tol, g.centroid_dtype, name)
