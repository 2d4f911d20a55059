"""What to quantize and how: `Rule`, `Recipe`, and the pure `plan()`.

A target is an exact module name (``encoder.layer.0.output.dense``), a class name (``Linear``), or
``re:<regex>`` matched against the whole module name. The last rule whose targets match a module
(and whose ignore list does not) decides it.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace

import torch

from .algorithms import ALGORITHMS, check_options
from .errors import RecipeError, SchemeError
from .nn import float_classes, quantized_class
from .primitives.affine import as_2d, group_mismatch
from .spec import ActSpec, QuantSpec, Scheme, parse

# methods whose weights come from training (`lowbit.qat.convert`), never from `quantize`
TRAINED_METHODS = ("qat", "lsq")




@dataclass(frozen=True)
class Rule:
    """Modules matching ``targets`` (and no ``ignore`` pattern) get ``spec`` for their weights and
    ``input_spec`` for their inputs. ``spec`` may be given as a scheme string (``"w8a8"`` sets
    both), a `QuantSpec` or a `Scheme`."""
    targets: tuple[str, ...]
    spec: QuantSpec
    ignore: tuple[str, ...] = ()
    method: str = "rtn"
    input_spec: ActSpec | None = None
    options: tuple[tuple[str, object], ...] = ()  # the method's options (e.g. GPTQ's damp), sorted pairs

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _names(self.targets, "targets"))
        object.__setattr__(self, "ignore", _names(self.ignore, "ignore"))
        scheme = parse(self.spec)
        if scheme.input is not None and self.input_spec is not None and scheme.input != self.input_spec:
            raise RecipeError(f"scheme {scheme.name!r} names inputs and input_spec differs; give one")
        object.__setattr__(self, "spec", scheme.weight)
        object.__setattr__(self, "input_spec", self.input_spec or scheme.input)
        if self.input_spec is not None and not isinstance(self.input_spec, ActSpec):
            raise RecipeError(f"input_spec must be an ActSpec or None, found {self.input_spec!r}")
        if not self.targets:
            raise RecipeError("a Rule needs at least one target")
        for t in self.targets + self.ignore:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as exc:
                    raise RecipeError(f"bad regex in target {t!r}: {exc}") from None
        if self.method not in tuple(ALGORITHMS) + TRAINED_METHODS:
            raise RecipeError(f"unknown method {self.method!r}; available: {tuple(ALGORITHMS)} (and "
                              f"{TRAINED_METHODS} for weights from lowbit.qat.convert)")
        try:
            opts = check_options(self.method, dict(self.options))
        except (TypeError, ValueError) as exc:
            raise RecipeError(str(exc)) from None
        object.__setattr__(self, "options", tuple(sorted(opts.items())))

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.spec, self.input_spec)

    @property
    def input_mode(self) -> str | None:
        return None if self.input_spec is None else ("static" if self.input_spec.static else "dynamic")

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "ignore": list(self.ignore),
                "spec": self.spec.to_dict(), "method": self.method,
                "input_spec": None if self.input_spec is None else self.input_spec.to_dict(),
                **({"options": dict(self.options)} if self.options else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        if not isinstance(d, dict) or "targets" not in d or "spec" not in d:
            raise RecipeError(f"a rule needs 'targets' and 'spec', found {d!r:.200}")
        try:
            act = d.get("input_spec")
            return cls(tuple(d["targets"]), QuantSpec.from_dict(d["spec"]), tuple(d.get("ignore", ())),
                       d.get("method", "rtn"), None if act is None else ActSpec.from_dict(act),
                       tuple(dict(d.get("options") or {}).items()))
        except SchemeError as exc:
            raise RecipeError(f"bad rule {d!r:.200}: {exc}") from None


@dataclass(frozen=True)
class Recipe:
    """Rules in order (the last matching rule wins for a module). ``skip_output_head``: the
    model's output head stays float unless a target names it. ``group_fallback``: a layer whose
    input width its rule's group size does not divide takes the largest power-of-two group below
    it that does (at least `MIN_FALLBACK_GROUP`; the plan says so) instead of being skipped, as
    llama.cpp falls back to another block type for such tensors (SmolLM2's 576-wide layers at
    group 128 take group 64)."""
    rules: tuple[Rule, ...]
    skip_output_head: bool = True
    group_fallback: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.group_fallback, bool):
            raise RecipeError(f"group_fallback must be True or False, found {self.group_fallback!r}")

    def to_json(self) -> str:
        return json.dumps({"rules": [r.to_dict() for r in self.rules],
                           "skip_output_head": self.skip_output_head,
                           "group_fallback": self.group_fallback}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise RecipeError(f"a recipe must be JSON: {exc}") from None
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise RecipeError("a recipe is a JSON object with a list 'rules'")
        return cls(tuple(Rule.from_dict(r) for r in d["rules"]), d.get("skip_output_head", True),
                   d.get("group_fallback", False))


def _names(x: object, what: str) -> tuple[str, ...]:
    """A single name is a one-element tuple, never a tuple of its characters."""
    if isinstance(x, str):
        x = (x,)
    if not isinstance(x, (tuple, list)):
        raise RecipeError(f"{what} must be a name or a list of names, found {type(x).__name__}")
    for t in x:
        if not isinstance(t, str) or not t:
            raise RecipeError(f"{what} must be non-empty strings (exact name, class name or "
                              f"re:<regex>), found {t!r}")
    return tuple(x)


def matches(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


@dataclass(frozen=True)
class Plan:
    """module name -> Rule for the layers to quantize; module name -> reason for those skipped;
    alias -> planned name for a module registered under more than one name (it stays shared);
    module name -> why its rule's group size was replaced (`Recipe.group_fallback`)."""
    layers: dict[str, Rule] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{n}: {r.scheme.name} ({r.method})"
                 + (f" [{self.fallbacks[n]}]" if n in self.fallbacks else "")
                 for n, r in self.layers.items()]
        lines += [f"{a}: same module as {n}" for a, n in self.aliases.items()]
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


def plan(model: torch.nn.Module, recipe: Recipe, allow_empty: bool = False) -> Plan:
    """Decide, without touching the model, which modules get which rule.

    Raises `RecipeError` when a target matches no module (naming it, with the closest names), or
    when nothing would be quantized, unless ``allow_empty``.
    """
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a lowbit.Recipe, found {type(recipe).__name__}")
    head = output_head(model) if recipe.skip_output_head else None
    layers, skipped, aliases, first, fallbacks = {}, {}, {}, {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:  # the same module under a second name: it stays one module
            if first[id(module)] in layers:
                aliases[name] = first[id(module)]
            continue
        first[id(module)] = name
        rule = _rule_for(recipe, name, module)
        if rule is None:
            continue
        why = _skip_reason(name, head, module, rule)
        if why and recipe.group_fallback and name != head:
            smaller = _fallback_rule(module, rule)
            if smaller is not None and _skip_reason(name, head, module, smaller) is None:
                fallbacks[name] = (f"group {smaller.spec.group_size}: {rule.spec.group_size} does "
                                   f"not divide its {_in_width(module)} input columns")
                rule, why = smaller, None
        if why:
            skipped[name] = why
        else:
            layers[name] = rule
    if not allow_empty:
        _check_targets(model, recipe)
        if not layers:
            raise RecipeError(_nothing_message(recipe, skipped))
    return Plan(layers, skipped, aliases, fallbacks)


MIN_FALLBACK_GROUP = 16  # smaller groups store a scale for every few weights: skip instead


def _in_width(module: torch.nn.Module) -> int:
    w = module.weight
    return as_2d(w).shape[1] if w.dim() > 1 else w.numel()


def _fallback_rule(module: torch.nn.Module, rule: Rule) -> Rule | None:
    """``rule`` with the largest power-of-two group size below its own that divides the module's
    input width (>= `MIN_FALLBACK_GROUP`), or None (not a group mismatch, or no such group)."""
    spec = rule.spec
    if spec.granularity != "group" or not hasattr(module, "weight"):
        return None
    cols = _in_width(module)
    if cols % spec.group_size == 0:
        return None
    g = 1 << (spec.group_size.bit_length() - 1)  # the largest power of two <= group_size
    g = g if g < spec.group_size else g // 2
    while g >= MIN_FALLBACK_GROUP and cols % g:
        g //= 2
    if g < MIN_FALLBACK_GROUP:
        return None
    return replace(rule, spec=replace(spec, group_size=g))


def _skip_reason(name: str, head: str | None, module: torch.nn.Module, rule: Rule) -> str | None:
    if name == "":
        return "the model itself is the layer; wrap it (nn.Sequential(model)) so it can be swapped"
    if name == head:
        return "output head (kept in float; name it in targets with skip_output_head=False)"
    return unsupported_reason(module, rule.spec, rule.input_mode)


def _check_targets(model: torch.nn.Module, recipe: Recipe) -> None:
    """Every target must match some module: a typo must not quantize nothing in silence."""
    named = list(model.named_modules(remove_duplicate=False))
    for rule in recipe.rules:
        dead = [t for t in rule.targets if not any(matches(t, n, m) for n, m in named)]
        if dead:
            raise RecipeError(f"target(s) {dead} match no module of this "
                              f"{type(model).__name__}; {_suggest(dead, named)}")


def _suggest(dead: list[str], named: list[tuple[str, torch.nn.Module]]) -> str:
    classes = sorted({type(m).__name__ for _, m in named})
    names = [n for n, _ in named if n]
    close = [c for t in dead for c in difflib.get_close_matches(t.removeprefix("re:"), classes + names, 3, 0.6)]
    hint = f"did you mean {sorted(set(close))}? " if close else ""
    return (f"{hint}module classes here: {classes[:20]}; a target is an exact module name, a class "
            "name or re:<regex> (full match on the name)")


def _nothing_message(recipe: Recipe, skipped: dict[str, str]) -> str:
    targets = sorted({t for r in recipe.rules for t in r.targets})
    why = "; ".join(f"{n}: {w}" for n, w in list(skipped.items())[:5])
    more = f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return (f"nothing to quantize: targets {targets} matched no layer that can be quantized"
            + (f"; skipped {why}{more}" if skipped else "")
            + ". Pass allow_empty=True to accept an unchanged model")


def _rule_for(recipe: Recipe, name: str, module: torch.nn.Module) -> Rule | None:
    chosen = None
    for rule in recipe.rules:
        if any(matches(t, name, module) for t in rule.targets) and \
                not any(matches(i, name, module) for i in rule.ignore):
            chosen = rule
    return chosen


def unsupported_reason(module: torch.nn.Module, spec: QuantSpec, input_mode: str | None = None
                       ) -> str | None:
    """Why ``module`` cannot be quantized under ``spec`` (and ``input_mode``), or None if it can."""
    if quantized_class(module, "affine", None) is None:
        return f"unsupported module type {type(module).__name__}; supported: " + \
            ", ".join(c.__name__ for c in float_classes())
    cls = quantized_class(module, "affine", input_mode)
    if cls is None:
        return f"{input_mode} int8 inputs are not built for {type(module).__name__}"
    why = getattr(cls, "unsupported", None)
    if why is not None and why(module, spec):
        return why(module, spec)
    w = module.weight
    if isinstance(module, torch.nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embeddings with max_norm or sparse gradients are not supported"
    if isinstance(module, torch.nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} is not supported"
    return group_mismatch(as_2d(w).shape[1] if w.dim() > 1 else w.numel(), spec)
