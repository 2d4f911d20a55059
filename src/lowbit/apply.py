"""`apply`: the one function in lowbit that changes a model (and `apply_blocks`, its
block-by-block form for algorithms whose statistics depend on the layers already quantized)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS, LayerStats
from .errors import QuantizationError
from .nn import quantized_class
from .primitives import QuantizedWeight
from .primitives.metrics import sqnr_db
from .recipe import Plan, Rule
from .textable import text_table

# hooks that keep working on the quantized module (the dicts themselves move over, so the
# user's RemovableHandles still remove them); any other kind of hook is named in a warning
CARRIED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
DROPPED_HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


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
    """What `apply` did: layers quantized (with bytes and SQNR), layers skipped (with reasons),
    names that share a quantized module, and warnings (e.g. hooks that could not be carried)."""
    layers: list[LayerResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    @property
    def quant_bytes(self) -> int:
        return sum(r.quant_bytes for r in self.layers)

    def __str__(self) -> str:
        ratio = f" ({self.quant_bytes / self.float_bytes:.3f}x)" if self.float_bytes else ""
        out = [f"lowbit: quantized {len(self.layers)} layers, skipped {len(self.skipped)}; "
               f"their weights {self.float_bytes / 1e6:.2f} MB -> {self.quant_bytes / 1e6:.2f} MB{ratio}"]
        by_scheme: dict[tuple[str, str], list[LayerResult]] = {}
        for r in self.layers:
            by_scheme.setdefault((r.scheme, r.method), []).append(r)
        rows = [(s, m, len(rs), f"{sum(r.float_bytes for r in rs) / 1e6:.2f}",
                 f"{sum(r.quant_bytes for r in rs) / 1e6:.2f}") for (s, m), rs in by_scheme.items()]
        if rows:
            out.append(text_table(("scheme", "method", "layers", "MB before", "MB after"), rows,
                                  (False, False, True, True, True)))
        out += [f"  shared: {a} is the same module as {n}" for a, n in self.aliases.items()]
        out += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        out += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(out)


def apply(model: torch.nn.Module, plan: Plan, weights: dict[str, QuantizedWeight] | None = None,
          sqnr: dict[str, float | None] | None = None, stats: dict[str, LayerStats] | None = None,
          progress: bool = False) -> Report:
    """Swap every planned module for its quantized twin, in place.

    ``weights`` (from a file) supplies the quantized weights; without it each float weight is
    quantized by the rule's method (with the layer's calibration ``stats`` when given) and its SQNR
    measured. Every module is built before any is swapped: a failure leaves the model as it was.
    """
    report = Report(skipped=dict(plan.skipped), aliases=dict(plan.aliases))
    built = [_build(model, name, rule, weights, sqnr, stats, report)
             for name, rule in tqdm(list(plan.layers.items()), desc="quantize", disable=not progress,
                                    unit="layer")]
    _swap_all(model, plan, built, report)
    return report


def apply_blocks(model: torch.nn.Module, plan: Plan, blocks: list[list[str]],
                 stats_for: Callable[[list[str]], dict[str, LayerStats]], progress: bool = False) -> Report:
    """Quantize block after block: ``stats_for(names)`` calibrates a block's layers on the model
    as it is now (earlier blocks already quantized), then that block is built and swapped in.
    Every planned layer must be in exactly one block. A failure restores every block swapped so far."""
    listed = [n for b in blocks for n in b]
    if sorted(listed) != sorted(plan.layers):
        missing, extra = set(plan.layers) - set(listed), set(listed) - set(plan.layers)
        raise ValueError(f"blocks must list each planned layer once; missing {sorted(missing)[:5]}, "
                         f"not planned or repeated {sorted(extra)[:5] or 'duplicates'}")
    report = Report(skipped=dict(plan.skipped), aliases=dict(plan.aliases))
    undo: list[tuple[str, torch.nn.Module]] = []
    try:
        for block in tqdm(blocks, desc="quantize blocks", disable=not progress, unit="block"):
            stats = stats_for(list(block))
            built = [_build(model, n, plan.layers[n], None, None, stats, report) for n in block]
            sub = Plan({n: plan.layers[n] for n in block}, {},
                       {a: n for a, n in plan.aliases.items() if n in block})
            undo += [(n, model.get_submodule(n)) for n in block]
            undo += [(a, model.get_submodule(a)) for a in sub.aliases]
            _swap_all(model, sub, built, report)
    except BaseException:
        for name, original in reversed(undo):
            replace_module(model, name, original)
        raise
    return report


def _build(model: torch.nn.Module, name: str, rule: Rule, weights, sqnr, stats, report: Report):
    module = model.get_submodule(name)
    if weights is None:
        w = module.weight.detach()
        if w.is_meta:
            raise QuantizationError(f"{name}: weights are on the meta device; load real weights "
                                    "before quantizing")
        qw = ALGORITHMS[rule.method](w, rule.spec, name, (stats or {}).get(name), **dict(rule.options))
        db = sqnr_db(w, qw.dequantize())
    else:
        qw, db = weights[name], (sqnr or {}).get(name)
    cls = quantized_class(module, qw.KIND, rule.input_mode)
    new = cls.from_float(module, qw, rule.method, db, rule.input_spec)
    float_bytes = module.weight.numel() * module.weight.element_size()
    report.layers.append(LayerResult(name, rule.scheme.name, rule.method, float_bytes, qw.nbytes, db))
    return name, new


def _swap_all(model: torch.nn.Module, plan: Plan, built: list[tuple[str, torch.nn.Module]],
              report: Report) -> None:
    for name, new in built:
        report.warnings += _carry_hooks(name, model.get_submodule(name), new)
    for name, new in built:
        replace_module(model, name, new)
    for alias, name in plan.aliases.items():
        replace_module(model, alias, model.get_submodule(name))
    for w in report.warnings:
        warnings.warn(w, stacklevel=3)


def _carry_hooks(name: str, old: torch.nn.Module, new: torch.nn.Module) -> list[str]:
    for attr in CARRIED_HOOKS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    dropped = [a.strip("_") for a in DROPPED_HOOKS if getattr(old, a, None)]
    return [f"{name}: {', '.join(dropped)} hook(s) were not carried to the quantized module"] if dropped else []


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Set the submodule at dotted ``name`` (the one place a parent module is looked up)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
