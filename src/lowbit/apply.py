"""`apply`: the one function in lowbit that changes a model (and `apply_blocks`, its
block-by-block form for algorithms whose statistics depend on the layers already quantized)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS, LayerStats
from .algorithms.smooth import check_factors, fold_consumer, fold_producer
from .errors import QuantizationError
from .nn import quantized_class
from .primitives import QuantizedWeight
from .primitives.qweight import weight_sqnr_db
from .primitives.tokens import static_input_params
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
    speed: list[str] = field(default_factory=list)  # the guardrail's lines (lowbit.guardrail)
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer -> its smaller group (Plan)

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
        if self.speed:
            out += ["speed on this CPU (path taken; time vs the float layer):"] + self.speed
        out += [f"  shared: {a} is the same module as {n}" for a, n in self.aliases.items()]
        out += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        out += [f"  {n}: {why}" for n, why in self.fallbacks.items()]
        out += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(out)


def apply(model: torch.nn.Module, plan: Plan, weights: dict[str, QuantizedWeight] | None = None,
          sqnr: dict[str, float | None] | None = None, stats: dict[str, LayerStats] | None = None,
          progress: bool = False, input_params: dict[str, dict] | None = None,
          input_smooth: dict[str, torch.Tensor] | None = None) -> Report:
    """Swap every planned module for its quantized twin, in place.

    ``weights`` (from a file) supplies the quantized weights, and ``input_params`` the static
    input grids; without them each float weight is quantized by the rule's method (with the
    layer's calibration ``stats`` when given, which also give static input grids) and its SQNR
    measured. ``input_smooth`` (layer -> factors ``s`` (in_features,)) smooths dynamic int8 inputs
    at run time (`QLinearA8`): the weight is quantized as ``W * s``; with ``weights`` from a file
    the factors are placeholders that the file's ``smooth`` tensor then fills.
    Every module is built before any is swapped: a failure leaves the model as it was.
    """
    report = Report(skipped=dict(plan.skipped), aliases=dict(plan.aliases),
                    fallbacks=dict(plan.fallbacks))
    built = [_build(model, name, rule, weights, sqnr, stats, report, input_params, input_smooth)
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
    report = Report(skipped=dict(plan.skipped), aliases=dict(plan.aliases),
                    fallbacks=dict(plan.fallbacks))
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


@contextlib.contextmanager
def applied(model: torch.nn.Module, plan: Plan, stats: dict[str, LayerStats] | None = None
            ) -> Iterator[Report]:
    """`apply` for the length of a with-block: the planned modules (and their aliases) are put back
    when it exits, even on error. Sensitivity and tuning quantize one layer or one mix at a time
    this way instead of copying the model."""
    originals = [(n, model.get_submodule(n)) for n in [*plan.layers, *plan.aliases]]
    try:
        yield apply(model, plan, stats=stats)
    finally:
        for name, original in originals:
            replace_module(model, name, original)


def _build(model: torch.nn.Module, name: str, rule: Rule, weights, sqnr, stats, report: Report,
           input_params: dict[str, dict] | None = None,
           input_smooth: dict[str, torch.Tensor] | None = None):
    module = model.get_submodule(name)
    smooth = (input_smooth or {}).get(name)
    if weights is None:
        w = module.weight.detach()
        w = w if smooth is None else w * smooth.to(w.dtype)  # (N, K) * (K,): SmoothQuant's W * s
        if w.is_meta:
            raise QuantizationError(f"{name}: weights are on the meta device; load real weights "
                                    "before quantizing")
        if rule.method not in ALGORITHMS:
            raise QuantizationError(f"{name}: method {rule.method!r} takes its weights from "
                                    f"training (lowbit.qat.convert); post-training methods: "
                                    f"{sorted(ALGORITHMS)}")
        qw = ALGORITHMS[rule.method](w, rule.spec, name, (stats or {}).get(name), **dict(rule.options))
        db = weight_sqnr_db(w, qw)  # by row blocks: no full-size float temporaries
    else:
        qw, db = weights[name], (sqnr or {}).get(name)
    cls = quantized_class(module, qw.KIND, rule.input_mode)
    extra = {}
    if rule.input_mode == "static":
        extra["input_params"] = (input_params or {}).get(name) if weights is not None \
            else _static_params(name, stats)
    if smooth is not None:
        extra["input_smooth"] = smooth
    new = cls.from_float(module, qw, rule.method, db, rule.input_spec, **extra)
    float_bytes = module.weight.numel() * module.weight.element_size()
    report.layers.append(LayerResult(name, rule.scheme.name, rule.method, float_bytes, qw.nbytes, db))
    return name, new


def _static_params(name: str, stats: dict[str, LayerStats] | None) -> dict:
    s = (stats or {}).get(name)
    if s is None or s.input_range is None:
        raise QuantizationError(f"{name}: static int8 inputs need a calibrated input range "
                                "(pass data=... to quantize)")
    return static_input_params(*s.input_range)


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


@dataclass(frozen=True)
class ChannelScale:
    """Divide ``producer``'s output channels by ``factors`` (C,) and multiply the input columns of
    each Linear in ``consumers`` by them (SmoothQuant's fold, `algorithms.smooth`)."""
    producer: str
    consumers: tuple[str, ...]
    factors: torch.Tensor


def scale_channels(model: torch.nn.Module, scales: Sequence[ChannelScale],
                   check: Callable[[], None] | None = None) -> None:
    """Fold every ``scales`` entry into the model's parameters, in place (the same Parameter
    objects, new values), all or nothing.

    Every entry is validated first (modules, shapes, factors, and no consumer weight shared with a
    module outside its pair). Then the producers' new values are written (their old ones kept:
    norm weights and the odd Linear, small) and ``check()`` runs with each consumer's input
    multiplied by its factors (a pre-hook: the fold's effect on the consumer, ``W diag(s) x =
    W (s * x)``, up to rounding). If it raises, the producers get their old values back and the
    model is as it was; else the consumers' weights are folded in place. So no copy of the
    consumers' weights is ever held (SmolLM2: 280 MB, the largest part of smoothing's memory)."""
    plan = []  # (producer weight, producer bias, factors, {consumer name: module})
    for sc in scales:
        prod = model.get_submodule(sc.producer)
        w, b = getattr(prod, "weight", None), getattr(prod, "bias", None)
        if not isinstance(w, torch.Tensor) or w.dim() not in (1, 2):
            raise QuantizationError(f"{sc.producer}: a smoothing producer needs a per-channel weight "
                                    f"(a norm's (C,) or a Linear's (C, K)), found {type(prod).__name__}")
        check_factors(sc.factors, w.shape[0], sc.producer)
        consumers = {}
        for name in sc.consumers:
            cons = model.get_submodule(name)
            if not isinstance(cons, torch.nn.Linear):
                raise QuantizationError(f"{name}: a smoothing consumer must be a torch.nn.Linear, "
                                        f"found {type(cons).__name__}")
            check_factors(sc.factors, cons.in_features, name)
            consumers[name] = cons
        plan.append((w, b, sc.factors, consumers))
    _check_unshared(model, scales)
    old: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (param, old value)
    try:
        for w, b, factors, _ in plan:
            new_w, new_b = fold_producer(w, b, factors)  # (validated above: cannot raise)
            for p, new in ((w, new_w), (b, new_b)):
                if p is not None:
                    old.setdefault(id(p), (p, p.detach().clone()))
                    with torch.no_grad():
                        p.copy_(new)
        if check is not None:
            with _inputs_scaled([(list(consumers.values()), factors)
                                 for _, _, factors, consumers in plan]):
                check()
    except BaseException:
        with torch.no_grad():
            for p, value in old.values():
                p.copy_(value)
        raise
    for _, _, factors, consumers in plan:
        for name, cons in consumers.items():
            with torch.no_grad():
                cons.weight.copy_(fold_consumer(cons.weight, factors, name))


def _check_unshared(model: torch.nn.Module, scales: Sequence[ChannelScale]) -> None:
    """Refuse a consumer weight that another module also holds (tied weights): folding it would
    change that module too."""
    holders: dict[int, list[str]] = {}  # a parameter's first element's address -> its modules
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.numel() and p.data_ptr():
            holders.setdefault(p.data_ptr(), []).append(name.rsplit(".", 1)[0] if "." in name else "")
    for sc in scales:
        for name in sc.consumers:
            weight = model.get_submodule(name).weight
            others = [h for h in holders.get(weight.data_ptr(), []) if h != name]
            if others:
                raise QuantizationError(f"{name}: its weight is shared with {others}; smoothing "
                                        "would change them too")


@contextlib.contextmanager
def _inputs_scaled(groups: list[tuple[list[torch.nn.Module], torch.Tensor]]) -> Iterator[None]:
    """Within the block, each module's first input is multiplied by its factors (C,)."""
    def hook_for(factors: torch.Tensor) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
            if args:
                return (args[0] * factors.to(args[0].dtype),) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: kwargs[key] * factors.to(kwargs[key].dtype)}
        return hook

    handles = []
    try:
        for modules, factors in groups:
            for m in modules:
                handles.append(m.register_forward_pre_hook(hook_for(factors), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def swap_modules(model: torch.nn.Module, new: dict[str, torch.nn.Module]) -> dict[str, str]:
    """Replace modules by name, all or nothing: every other name of a replaced module gets the same
    new module (shared modules stay shared), forward hooks move over (others are warned about).
    Used by QAT (fake-quant twins and back), Quant-Noise and iPQ. Returns {alias: name} for the
    extra names replaced."""
    owners = {}  # id(old module) -> every name it has
    for n, m in model.named_modules(remove_duplicate=False):
        owners.setdefault(id(m), []).append(n)
    olds, chosen, aliases = {}, {}, {}
    for name, module in new.items():
        try:
            olds[name] = model.get_submodule(name) if name else None
        except AttributeError:
            raise QuantizationError(f"swap_modules: the model has no module {name!r}") from None
        if olds[name] is None or not isinstance(module, torch.nn.Module):
            raise QuantizationError(f"swap_modules: {name!r} must name a submodule and map to a "
                                    f"torch.nn.Module, found {type(module).__name__}")
        prior = chosen.setdefault(id(olds[name]), module)
        if prior is not module:
            raise QuantizationError(f"swap_modules: {name!r} shares its module with another name "
                                    "given a different replacement")
    done: list[tuple[str, torch.nn.Module]] = []
    placed: set[int] = set()
    try:
        for name, module in new.items():
            old = olds[name]
            if any(d[0] == name for d in done):
                continue
            if id(module) not in placed:  # hooks come from the first module it replaces
                placed.add(id(module))
                for w in _carry_hooks(name, old, module):
                    warnings.warn(w, stacklevel=2)
            for other in owners[id(old)]:
                done.append((other, old))
                replace_module(model, other, module)
                if other != name and other not in new:
                    aliases[other] = name
    except BaseException:
        for name, original in reversed(done):
            replace_module(model, name, original)
        raise
    return aliases
