"""Quantization-aware training: `prepare` swaps planned layers for fake-quantized twins that train
with a straight-through estimator (Bengio et al. 2013, arXiv 1308.3432) or a learned step size
(LSQ, Esser et al. 2020, arXiv 1902.08153); `convert` turns them into the very quantized layers
post-training quantization makes (`QLinear`, `QConv2d`, `QEmbedding`), built by `apply` from each
twin's `quantized_weight()`. Both change the model only through `lowbit.apply`.

    qat = lowbit.qat.prepare(model, "w4g32")          # same arguments as lowbit.quantize
    train(qat)                                         # the user's loop, unchanged
    model = lowbit.qat.convert(qat)                    # saves and loads as usual
"""
from __future__ import annotations

from typing import Sequence

import torch

from .api import plan as plan_layers
from .apply import Report, apply, swap_modules
from .errors import QuantizationError, RecipeError
from .nn.fake import FAKE_QUANT_TABLE, FakeQuantModule
from .primitives.metrics import sqnr_db
from .recipe import Plan, Rule
from .spec import QuantSpec, Scheme


def prepare(model: torch.nn.Module, scheme: "str | QuantSpec | Scheme" = "w4g128",
            targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
            learn_scale: bool = False, allow_empty: bool = False) -> torch.nn.Module:
    """Swap the layers `lowbit.quantize` would quantize (same ``scheme``, ``targets``,
    ``ignore``) for fake-quantized twins holding the same Parameters, in place; returns the model.
    ``learn_scale=True`` learns each step (LSQ); otherwise ranges follow the weight (an observer)
    until `freeze_ranges`."""
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    fakes = [n for n, m in model.named_modules() if isinstance(m, FakeQuantModule)]
    if fakes:
        raise RecipeError(f"the model already has fake-quantized layers {fakes[:3]}; "
                          "convert it (lowbit.qat.convert) or start from the float model")
    the_plan = plan_layers(model, scheme, targets, ignore, allow_empty=allow_empty)
    new = {}
    for name, rule in the_plan.layers.items():
        if rule.input_spec is not None:
            raise RecipeError(f"{name}: QAT fake-quantizes weights only; scheme "
                              f"{rule.scheme.name!r} also quantizes inputs")
        module = model.get_submodule(name)
        new[name] = FAKE_QUANT_TABLE[type(module)](module, rule.spec, learn_scale, name)
    swap_modules(model, new)
    return model


def fake_layers(model: torch.nn.Module) -> dict[str, FakeQuantModule]:
    """The model's fake-quantized layers, each once under its first name."""
    out: dict[str, FakeQuantModule] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantModule) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def freeze_ranges(model: torch.nn.Module) -> int:
    """Freeze every observer's ranges at the current weights (LSQ layers keep learning); returns
    how many layers were frozen now."""
    fresh = [m for m in fake_layers(model).values() if not m.learn_scale and not m.ranges_frozen]
    for m in fresh:
        m.freeze_ranges()
    return len(fresh)


def convert(model: torch.nn.Module, verbose: bool = False) -> torch.nn.Module:
    """Replace every fake-quantized layer by the quantized layer post-training quantization makes
    for its current weight and (observed, frozen or learned) parameters, in place; returns the
    model (``model.lowbit_report`` says what changed). All or nothing."""
    layers = fake_layers(model)
    if not layers:
        raise QuantizationError("convert: the model has no fake-quantized layers "
                                "(lowbit.qat.prepare makes them)")
    weights, sqnr, rules = {}, {}, {}
    with torch.no_grad():
        for name, fq in layers.items():
            qw = fq.quantized_weight()
            weights[name], sqnr[name] = qw, sqnr_db(fq.weight.detach(), qw.dequantize())
            rules[name] = Rule((name,), fq.spec, method="lsq" if fq.learn_scale else "qat")
    floats = {name: fq.to_float() for name, fq in layers.items()}
    aliases = swap_modules(model, floats)
    try:
        report = apply(model, Plan(rules, {}, aliases), weights=weights, sqnr=sqnr)
    except BaseException:
        swap_modules(model, dict(layers))
        raise
    model.lowbit_report = report
    if verbose:
        print(report)
    return model


__all__ = ["Report", "convert", "fake_layers", "freeze_ranges", "prepare"]
