"""Iterative product quantization (iPQ; Stock et al., "And the Bit Goes Down", arXiv 1907.05686;
Fan, Stock et al., arXiv 2004.07320): stage by stage (the config's order, e.g. ffn -> emb ->
attn), each matching layer's weight replaced by k-means centroids over blocks of inputs, then the
user's ``finetune(model)`` trains the centroids of every layer quantized so far before the next stage.

    model = lowbit.ipq.quantize(model, lowbit.ipq.Config.from_yaml("ipq.yaml"), finetune=train)
    print(lowbit.ipq.size_report(model))   # exact bytes: centroids + packed assignments + floats

Layers change only through `apply.swap_modules`.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .algorithms.ipq import group_of, quantize_layer, unsupported_reason
from .apply import swap_modules
from .io.serialize import nonpersistent_buffers
from .ipq_config import IPQConfig, IPQConfigError, LayerGroup
from .ipq_size import SizeReport, codebook_size, float_size
from .nn import quantized_class
from .nn.pq import PQModule
from .primitives.metrics import sqnr_db

Config = IPQConfig


def plan_stages(model: torch.nn.Module, config: IPQConfig
                ) -> tuple[list[list[str]], dict[str, str]]:
    """Layer names per stage (module order; each module once, in the first stage that claims it)
    and the layers a stage claimed but cannot take, with the reason."""
    stages: list[list[str]] = [[] for _ in config.groups]
    skipped, seen = {}, set()
    for name, module in model.named_modules():
        if not name or id(module) in seen or isinstance(module, PQModule):
            continue
        seen.add(id(module))
        i = group_of(config, name, module)
        if i is None:
            continue
        why = unsupported_reason(module, config.groups[i])
        if why:
            skipped[name] = why
        else:
            stages[i].append(name)
    return stages, skipped


def quantize(model: torch.nn.Module, config: IPQConfig,
             finetune: Callable[..., Any] | None = None, data: Any = None,
             verbose: bool = True) -> torch.nn.Module:
    """Quantize ``model`` in place, stage by stage; returns it. After each stage the centroids of
    all PQ layers are made trainable and ``finetune(model)`` (``finetune(model, data)`` when
    ``data`` is given) runs; they are frozen again afterwards. A stage that matches no layer is
    an error naming it."""
    if not isinstance(config, IPQConfig):
        raise IPQConfigError(f"config must be a lowbit.ipq.Config, found {type(config).__name__}")
    stages, skipped = plan_stages(model, config)
    empty = [g.name for g, names in zip(config.groups, stages) if not names]
    if empty:
        raise IPQConfigError(f"stage(s) {empty} match no layer iPQ can quantize; skipped: "
                             f"{dict(list(skipped.items())[:5])}; layer classes here: "
                             f"{sorted({type(m).__name__ for m in model.modules()})[:20]}")
    for i, names in enumerate(stages):
        _quantize_stage(model, config, i, names)
        if verbose:
            print(f"lowbit ipq: stage {config.groups[i].name!r}: {len(names)} layers", file=sys.stderr)
        if finetune is not None:
            pq_layers = [m for m in model.modules() if isinstance(m, PQModule)]
            for m in pq_layers:
                m.train_centroids(True)
            try:
                finetune(model) if data is None else finetune(model, data)
            finally:
                for m in pq_layers:
                    m.train_centroids(False)
    for name, why in skipped.items():
        if verbose:
            print(f"lowbit ipq: skipped {name}: {why}", file=sys.stderr)
    return model


def _quantize_stage(model: torch.nn.Module, config: IPQConfig, stage: int, names: list[str]) -> None:
    new = {}
    for j, name in enumerate(names):
        module = model.get_submodule(name)
        w = module.weight.detach()
        cw = quantize_layer(w, config, stage, j, name)
        cls = quantized_class(module, "codebook")
        new[name] = cls.from_float(module, cw, "ipq", sqnr_db(w, cw.dequantize()), None, name=name)
    swap_modules(model, new)


def size_report(model: torch.nn.Module) -> SizeReport:
    """Bytes of everything a lowbit file of ``model`` stores: each PQ layer's centroids and packed
    assignments, and every other tensor (biases, norms, unquantized layers, non-persistent
    buffers) at its own dtype; tied tensors once. Equals the file's tensor bytes."""
    rows, seen = [], set()
    pq_keys = set()
    for name, m in model.named_modules():
        if isinstance(m, PQModule):
            pq_keys |= {f"{name}.centroids", f"{name}.assignments"}
            if id(m) not in seen:
                seen.add(id(m))
                rows.append(codebook_size(name, m.codebook))
    stored: set[tuple[int, int]] = set()
    for key, t in {**model.state_dict(), **nonpersistent_buffers(model)}.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if ident in stored:
            continue
        stored.add(ident)
        if key not in pq_keys:
            rows.append(float_size(key, t))
    return SizeReport(tuple(rows))


__all__ = ["Config", "IPQConfig", "LayerGroup", "SizeReport", "plan_stages", "quantize", "size_report"]
