"""What to quantize and how: `Rule`, `Recipe`, and the pure `plan()`.

A target is an exact module name (``encoder.layer.0.output.dense``), a class name (``Linear``), or
``re:<regex>`` matched against the whole module name. The last rule whose targets match a module
(and whose ignore list does not) decides it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from .nn import SWAP_TABLE
from .primitives.affine import as_2d
from .spec import QuantSpec, parse_scheme

METHODS = ("rtn",)


class RecipeError(ValueError):
    """A rule or recipe lowbit cannot accept."""


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    spec: QuantSpec
    ignore: tuple[str, ...] = ()
    method: str = "rtn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _names(self.targets))
        object.__setattr__(self, "ignore", _names(self.ignore))
        object.__setattr__(self, "spec", parse_scheme(self.spec))
        if not self.targets:
            raise RecipeError("a Rule needs at least one target")
        for t in self.targets + self.ignore:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as exc:
                    raise RecipeError(f"bad regex in target {t!r}: {exc}") from None
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; available: {METHODS}")

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "ignore": list(self.ignore),
                "spec": self.spec.to_dict(), "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(tuple(d["targets"]), QuantSpec.from_dict(d["spec"]), tuple(d.get("ignore", ())),
                   d.get("method", "rtn"))


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]
    skip_output_head: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def to_json(self) -> str:
        return json.dumps({"rules": [r.to_dict() for r in self.rules],
                           "skip_output_head": self.skip_output_head}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        d = json.loads(text)
        return cls(tuple(Rule.from_dict(r) for r in d["rules"]), d.get("skip_output_head", True))


def _names(x: "str | tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """A single name is a one-element tuple, never a tuple of its characters."""
    return (x,) if isinstance(x, str) else tuple(x)


def matches(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


@dataclass(frozen=True)
class Plan:
    """module name -> Rule for the layers to quantize; module name -> reason for those skipped."""
    layers: dict[str, Rule] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{n}: {r.spec.name} ({r.method})" for n, r in self.layers.items()]
        lines += [f"{n}: skipped ({why})" for n, why in self.skipped.items()]
        return "\n".join(lines)


def output_head(model: torch.nn.Module) -> str | None:
    """The model's output head: transformers' output embeddings, else the last Linear."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and id(head) in names:
        return names[id(head)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def plan(model: torch.nn.Module, recipe: Recipe) -> Plan:
    """Decide, without touching the model, which modules get which rule."""
    head = output_head(model) if recipe.skip_output_head else None
    layers, skipped = {}, {}
    for name, module in model.named_modules():
        rule = _rule_for(recipe, name, module)
        if rule is None:
            continue
        if name == "":
            why = "the model itself is the layer; wrap it (nn.Sequential(model)) so it can be swapped"
        elif name == head:
            why = "output head (kept in float; name it in targets with skip_output_head=False)"
        else:
            why = unsupported_reason(module, rule.spec)
        if why:
            skipped[name] = why
        else:
            layers[name] = rule
    return Plan(layers, skipped)


def _rule_for(recipe: Recipe, name: str, module: torch.nn.Module) -> Rule | None:
    chosen = None
    for rule in recipe.rules:
        if any(matches(t, name, module) for t in rule.targets) and \
                not any(matches(i, name, module) for i in rule.ignore):
            chosen = rule
    return chosen


def unsupported_reason(module: torch.nn.Module, spec: QuantSpec) -> str | None:
    """Why ``module`` cannot be quantized under ``spec``, or None if it can."""
    if type(module) not in SWAP_TABLE:
        return f"unsupported module type {type(module).__name__}; supported: " + \
            ", ".join(c.__name__ for c in SWAP_TABLE)
    if spec.act_bits:
        return f"scheme {spec.name} quantizes activations, which lowbit does not do yet"
    w = module.weight
    if isinstance(module, torch.nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embeddings with max_norm or sparse gradients are not supported"
    if isinstance(module, torch.nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} is not supported"
    cols = as_2d(w).shape[1] if w.dim() > 1 else w.numel()
    if spec.granularity == "group" and cols % spec.group_size:
        return f"{cols} input columns are not divisible by group_size {spec.group_size}"
    return None
