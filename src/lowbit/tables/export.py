"""`export`: one table folder per ``nn.Embedding`` / ``nn.EmbeddingBag`` of a model."""
from __future__ import annotations

from pathlib import Path

import torch

from .build import build
from .format import TableError


def export(model: torch.nn.Module, out, bits: int = 4, *, range_method: str = "minmax",
           scale_dtype: str = "float16", overwrite: bool = False, progress: bool = False) -> dict[str, Path]:
    """Build ``out/<module name>`` (keys = row ids) from each embedding layer; returns name -> folder."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))}
    if not layers:
        raise TableError(f"{type(model).__name__}: no nn.Embedding or nn.EmbeddingBag layers to export")
    out = Path(out)
    done = {}
    for name, m in layers.items():
        if m.weight.device.type == "meta":
            raise TableError(f"{name}: weight is on the meta device; load the weights first")
        folder = out / (name or "embedding")
        build(m.weight.detach(), folder, bits=bits, range_method=range_method, scale_dtype=scale_dtype,
              overwrite=overwrite, progress=progress)
        done[name] = folder
    return done
