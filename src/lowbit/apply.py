"""`apply`: the one function in lowbit that changes a model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .eval.metrics import sqnr_db
from .nn import SWAP_TABLE
from .primitives import QuantizedWeight
from .recipe import Plan


@dataclass
class LayerResult:
    name: str
    scheme: str
    method: str
    float_bytes: int
    quant_bytes: int
    sqnr_db: float | None


@dataclass
class Report:
    """What `apply` did: layers quantized (with bytes and SQNR) and layers skipped (with reasons)."""
    layers: list[LayerResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    @property
    def quant_bytes(self) -> int:
        return sum(r.quant_bytes for r in self.layers)

    def __str__(self) -> str:
        out = [f"lowbit: quantized {len(self.layers)} layers, skipped {len(self.skipped)}; "
               f"their weights {self.float_bytes / 1e6:.2f} MB -> {self.quant_bytes / 1e6:.2f} MB"
               + (f" ({self.quant_bytes / self.float_bytes:.3f}x)" if self.float_bytes else "")]
        schemes: dict[str, int] = {}
        for r in self.layers:
            schemes[r.scheme] = schemes.get(r.scheme, 0) + 1
        out += [f"  {n} x {s}" for s, n in schemes.items()]
        out += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(out)


def apply(model: torch.nn.Module, plan: Plan, weights: dict[str, QuantizedWeight] | None = None,
          sqnr: dict[str, float | None] | None = None, progress: bool = False) -> Report:
    """Swap every planned module for its quantized twin, in place.

    ``weights`` (from a file) supplies the quantized weights; without it each float weight is
    quantized by the rule's method and its SQNR measured.
    """
    report = Report(skipped=dict(plan.skipped))
    built: list[tuple[str, torch.nn.Module]] = []
    items = list(plan.layers.items())
    for name, rule in tqdm(items, desc="quantize", disable=not progress, unit="layer"):
        module = model.get_submodule(name)
        if weights is None:
            w = module.weight.detach()
            qw = ALGORITHMS[rule.method](w, rule.spec, name)
            db = sqnr_db(w, qw.dequantize())
        else:
            qw, db = weights[name], (sqnr or {}).get(name)
        float_bytes = module.weight.numel() * module.weight.element_size()
        built.append((name, SWAP_TABLE[type(module)].from_float(module, qw, rule.method, db)))
        report.layers.append(LayerResult(name, rule.spec.name, rule.method, float_bytes, qw.nbytes, db))
    # swap only once every layer is built: a layer that fails to quantize leaves the model as it was
    for name, new in built:
        _replace(model, name, new)
    return report


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
