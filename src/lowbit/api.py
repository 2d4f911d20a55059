"""The one-line API: `quantize` a model in place under a scheme or a recipe."""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from .apply import Report, apply
from .io.format import tensors_sha256
from .recipe import Plan, Recipe, Rule
from .recipe import plan as plan_recipe
from .spec import QuantSpec

DEFAULT_TARGETS = ("Linear",)


def make_recipe(scheme: "str | QuantSpec | Recipe", targets: Sequence[str] | None = None,
                ignore: Sequence[str] = (), method: str = "rtn") -> Recipe:
    """A scheme plus targets/ignore -> a one-rule Recipe. Default targets: every Linear except the
    model's output head; naming targets yourself quantizes exactly what they match."""
    if isinstance(scheme, Recipe):
        if targets is not None or ignore:
            raise ValueError("pass targets/ignore inside the Recipe's rules, not next to it")
        return scheme
    rule = Rule(targets or DEFAULT_TARGETS, scheme, ignore, method)
    return Recipe((rule,), skip_output_head=targets is None)


def source_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the float model's state (meta tensors skipped), as `io.format` hashes files."""
    return tensors_sha256({k: t for k, t in model.state_dict().items() if not t.is_meta})


def quantize(model: torch.nn.Module, scheme: "str | QuantSpec | Recipe" = "w4g128",
             targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn",
             verbose: bool = True, progress: bool = False) -> torch.nn.Module:
    """Quantize ``model`` in place and return it; prints what was quantized and skipped."""
    recipe = make_recipe(scheme, targets, ignore, method)
    the_plan = plan_recipe(model, recipe)
    source = {"scheme": scheme if isinstance(scheme, str) else recipe.to_json(),
              "method": method, "source_sha256": source_sha256(model)}
    report = apply(model, the_plan, progress=progress)
    model.lowbit_source = source
    model.lowbit_report = report
    if verbose:
        print(report, file=sys.stderr)
    return model


def plan(model: torch.nn.Module, scheme: "str | QuantSpec | Recipe" = "w4g128",
         targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn") -> Plan:
    """What `quantize` with the same arguments would do, without touching the model."""
    return plan_recipe(model, make_recipe(scheme, targets, ignore, method))


__all__ = ["Plan", "Recipe", "Report", "Rule", "make_recipe", "plan", "quantize"]
