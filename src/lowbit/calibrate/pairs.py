"""Producer -> consumers pairs for SmoothQuant (`lowbit.smooth`): which Linears receive exactly the
tensor that one norm or Linear produced, and nothing else does.

Traced on one calibration batch, with hooks that live only inside `find_pairs` (removed in a
``finally``), the model in eval mode:

1. every candidate producer (a LayerNorm / RMSNorm with a per-channel weight, or a Linear) has its
   output replaced by a *marked* copy: the same values, ``out.detach().requires_grad_().view_as(out)``,
   so the marked tensor is the root of its own autograd node;
2. every Linear records the tensor object its forward received; a Linear is a consumer of the
   producer whose marked tensor it received (tensor identity, not equal values);
3. the autograd graph, walked from the model's outputs and every producer's own output, counts the
   ops that read each marked tensor. A producer is folded only if its consumers are its only
   readers and its output is not itself a model output: in a post-LN transformer (BERT) the
   LayerNorm's output also feeds the residual add, so dividing the LayerNorm by ``s`` would change
   the model; those consumers are left unsmoothed, with that reason.

`FALLBACKS` add pairs tracing cannot see because an op with per-channel-linear behaviour sits in
between: attention's value projection -> output projection (``softmax(QK^T) V`` mixes tokens, not
channels, so channel ``j`` of V is channel ``j`` of the attention context).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .collect import _eval_mode, call_model

# (producer suffix, consumer suffix): tried for consumers tracing found no producer for
FALLBACKS = (("attention.self.value", "attention.output.dense"),  # BERT family
             ("self_attn.v_proj", "self_attn.o_proj"))            # LLaMA family (no GQA)


@dataclass(frozen=True)
class Pair:
    producer: str
    consumers: tuple[str, ...]
    how: str  # "traced" or "fallback"


@dataclass
class PairSearch:
    pairs: list[Pair] = field(default_factory=list)
    unpaired: dict[str, str] = field(default_factory=dict)  # consumer name -> why not smoothed


def is_norm(module: torch.nn.Module) -> bool:
    """A norm whose output channel j is ``normalized_j * weight_j (+ bias_j)`` (so dividing weight
    and bias by ``s`` divides the output). Gemma's RMSNorm uses ``1 + weight`` and is excluded."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return True
    cls = type(module).__name__
    return cls.endswith(("RMSNorm", "LayerNorm")) and "Gemma" not in cls


def find_pairs(model: torch.nn.Module, batch: Any, names: Sequence[str] | None = None) -> PairSearch:
    """Pairs whose consumers include a Linear in ``names`` (default: every Linear); every consumer
    of a paired producer is listed, named or not. Named Linears left out get a reason."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = set(linears) if names is None else {n for n in names if n in linears}
    producers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_norm(m)}
    marked, received, roots, out = _trace(model, batch, producers, linears)
    readers = _reader_counts(roots + _tensors(out))
    outputs = {id(t) for t in _tensors(out)}
    by_id = {id(ts[0]): p for p, ts in marked.items() if len(ts) == 1}
    groups: dict[str, list[str]] = {}
    search = PairSearch(unpaired={n: "not a torch.nn.Linear (only Linears are smoothed)"
                                  for n in names or () if n not in linears})
    for c in linears:
        got = received.get(c, [])
        p = by_id.get(id(got[0])) if len(got) == 1 else None
        if p is not None and marked[p][0] is got[0]:
            groups.setdefault(p, []).append(c)
        elif c in wanted:
            search.unpaired[c] = ("called more than once per batch" if len(got) > 1 else
                                  "not called" if not got else
                                  "its input is not exactly the output of a norm or Linear")
    for p, cs in groups.items():
        why = _not_exclusive(p, marked[p][0], cs, readers, outputs)
        if not any(c in wanted for c in cs):
            continue
        if why:
            search.unpaired.update({c: f"producer {p}: {why}" for c in cs if c in wanted})
        else:
            search.pairs.append(Pair(p, tuple(cs), "traced"))
    _add_fallbacks(search, linears)
    return search


def _not_exclusive(p: str, t: torch.Tensor, consumers: list[str], readers: dict[int, int],
                   outputs: set[int]) -> str | None:
    if id(t) in outputs:
        return "its output is a model output"
    extra = readers.get(id(t.grad_fn), 0) - len(consumers)
    if extra > 0:
        return (f"its output also feeds {extra} other op(s) besides {len(consumers)} Linear(s) "
                "(e.g. a residual add); folding would change them")
    return None


def _add_fallbacks(search: PairSearch, linears: Mapping[str, torch.nn.Module]) -> None:
    for c in [c for c, why in search.unpaired.items() if why.startswith("its input is not")]:
        for p_suffix, c_suffix in FALLBACKS:
            if not c.endswith(c_suffix):
                continue
            p = c[: len(c) - len(c_suffix)] + p_suffix
            prod, cons = linears.get(p), linears[c]
            if prod is not None and prod.out_features == cons.in_features:
                search.pairs.append(Pair(p, (c,), "fallback"))
                del search.unpaired[c]
                break


def _trace(model: torch.nn.Module, batch: Any, producers: Mapping[str, torch.nn.Module],
           linears: Mapping[str, torch.nn.Module]):
    marked: dict[str, list[torch.Tensor]] = {}
    received: dict[str, list[Any]] = {}
    roots: list[torch.Tensor] = []

    def mark(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            roots.append(out)
            t = out.detach().requires_grad_().view_as(out)  # same values, its own autograd node
            marked.setdefault(name, []).append(t)
            return t
        return hook

    def record(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            received.setdefault(name, []).append(args[0] if args else next(iter(kwargs.values()), None))
        return hook

    with _eval_mode(model), _scoped_hooks(producers, mark, linears, record), torch.enable_grad():
        out = call_model(model, batch)
    return marked, received, roots, out


@contextlib.contextmanager
def _scoped_hooks(producers, mark, consumers, record) -> Iterator[None]:
    handles = []
    try:
        for n, m in producers.items():
            handles.append(m.register_forward_hook(mark(n)))
        for n, m in consumers.items():
            handles.append(m.register_forward_pre_hook(record(n), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _reader_counts(roots: list[torch.Tensor]) -> dict[int, int]:
    """id(autograd node) -> how many graph edges point at it (one per op input that reads it)."""
    counts: dict[int, int] = {}
    seen: set[int] = set()
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    keep = list(stack)  # node objects stay alive while their ids are compared
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is not None:
                counts[id(nxt)] = counts.get(id(nxt), 0) + 1
                keep.append(nxt)
                stack.append(nxt)
    return counts


def _tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict / ModelOutput), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []
