"""The one-line API: `quantize` a model in place under a scheme or a recipe."""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from .apply import Report, apply
from .errors import RecipeError
from .io.format import tensors_sha256
from .recipe import Plan, Recipe, Rule
from .recipe import plan as plan_recipe
from .spec import QuantSpec, Scheme

DEFAULT_TARGETS = ("Linear",)


def make_recipe(scheme: "str | QuantSpec | Scheme | Recipe", targets: Sequence[str] | None = None,
                ignore: Sequence[str] = (), method: str = "rtn") -> Recipe:
    """A scheme plus targets/ignore -> a one-rule Recipe. Default targets (``targets=None``): every
    Linear except the model's output head; naming targets yourself quantizes exactly what they match."""
    if isinstance(scheme, Recipe):
        if targets is not None or ignore:
            raise RecipeError("pass targets/ignore inside the Recipe's rules, not next to it")
        return scheme
    if targets is not None and not isinstance(targets, str) and len(targets) == 0:
        raise RecipeError("targets is empty: pass targets=None for the default (every Linear but "
                          "the output head), or name what to quantize")
    rule = Rule(DEFAULT_TARGETS if targets is None else targets, scheme, ignore, method)
    return Recipe((rule,), skip_output_head=targets is None)


def source_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the float model's state (meta tensors skipped), as `io.format` hashes files."""
    return tensors_sha256({k: t for k, t in model.state_dict().items() if not t.is_meta})


def quantize(model: torch.nn.Module, scheme: "str | QuantSpec | Scheme | Recipe" = "w4g128",
             targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn",
             allow_empty: bool = False, verbose: bool = True, progress: bool = False) -> torch.nn.Module:
    """Quantize ``model`` in place and return it; prints what was quantized and skipped.

    Raises `RecipeError` when a target matches no module or nothing would be quantized (unless
    ``allow_empty``), and `QuantizationError` naming the layer when a weight cannot be quantized;
    either way the model is left as it was.
    """
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    recipe = make_recipe(scheme, targets, ignore, method)
    the_plan = plan_recipe(model, recipe, allow_empty=allow_empty)
    source = {"scheme": scheme if isinstance(scheme, str) else recipe.to_json(),
              "method": method, "source_sha256": source_sha256(model)}
    if isinstance(scheme, str):
        source.update(targets=[targets] if isinstance(targets, str) else
                      (None if targets is None else list(targets)),
                      ignore=[ignore] if isinstance(ignore, str) else list(ignore))
    report = apply(model, the_plan, progress=progress)
    model.lowbit_source = source
    model.lowbit_report = report
    if verbose:
        print(report, file=sys.stderr)
    return model


def plan(model: torch.nn.Module, scheme: "str | QuantSpec | Scheme | Recipe" = "w4g128",
         targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn",
         allow_empty: bool = False) -> Plan:
    """What `quantize` with the same arguments would do, without touching the model."""
    return plan_recipe(model, make_recipe(scheme, targets, ignore, method), allow_empty=allow_empty)


__all__ = ["Plan", "Recipe", "Report", "Rule", "make_recipe", "plan", "quantize"]
