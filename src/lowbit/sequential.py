"""Sequential (block-by-block) calibration for models built from repeated blocks (transformers).

GPTQ (Frantar et al., arXiv 2210.17323, section 4 "Step 3" and its reference code) quantizes a
transformer one block at a time: the inputs of the first block are captured once, each block's
layers are calibrated on the inputs that the blocks before it, *already quantized*, produce, and
the quantized block is then run on those inputs to make the next block's::

    data --(model up to block 0)--> X0 --[block 0: calibrate, quantize, run]--> X1 --[block 1 ...]--> ...
    layers outside the blocks (before them, or after: heads, poolers) are one step each side

Working memory beyond the model is one block's statistics (Hessians) plus the captured
activations of every sample at one block boundary, instead of every layer's statistics at once.
The blocks are the children of the longest ``nn.ModuleList`` whose children hold planned layers.
Everything is built on `apply.apply_blocks` (which restores every block on failure) and
`calibrate.collect` / `calibrate.capture_inputs`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .algorithms import LayerStats
from .apply import Report, apply, apply_blocks
from .calibrate import capture_inputs, collect
from .calibrate.collect import CapturedInputs, _eval_mode, run_until
from .errors import RecipeError
from .recipe import Plan


def find_blocks(model: torch.nn.Module, layer_names: Iterable[str]) -> tuple[str, int]:
    """``(list_name, count)`` of the longest ``nn.ModuleList`` whose children hold planned layers.
    Raises `RecipeError` when the model has none (sequential mode needs repeated blocks)."""
    names = list(layer_names)
    best: tuple[str, int] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or not name:
            continue
        held = any(n.startswith(name + ".") for n in names)
        if held and (best is None or len(m) > best[1]):
            best = (name, len(m))
    if best is None:
        raise RecipeError(f"sequential=True needs a model made of repeated blocks (an nn.ModuleList "
                          f"holding planned layers); {type(model).__name__} has none")
    return best


def split_steps(model: torch.nn.Module, plan: Plan, list_name: str, count: int,
                data: list) -> tuple[list[str], list[list[str]], list[str]]:
    """Planned layers as (before the blocks, one list per block, after the blocks). "Before" are
    the outside layers that the first batch calls before block 0 starts."""
    blocks = [[n for n in plan.layers if n.startswith(f"{list_name}.{i}.")] for i in range(count)]
    inside = {n for b in blocks for n in b}
    outside = [n for n in plan.layers if n not in inside]
    called: list[str] = []
    if outside:
        handles = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, _a, n=n: called.append(n)) for n in outside]
        try:
            run_until(model, data[0], f"{list_name}.0")
        finally:
            for h in handles:
                h.remove()
    before = [n for n in outside if n in called]
    return before, blocks, [n for n in outside if n not in called]


class _BlockCall(torch.nn.Module):
    """Calls ``block`` with one `CapturedInputs` (so `collect` can run a block on captured inputs)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, captured: CapturedInputs) -> Any:
        return self.block(*captured.args, **captured.kwargs)


def without_caches(c: CapturedInputs) -> CapturedInputs:
    """Key/value caches (transformers' ``Cache`` objects) dropped: each block runs several times."""
    kwargs = {k: (None if hasattr(v, "get_seq_length") else v) for k, v in c.kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return CapturedInputs(c.args, kwargs)


def next_inputs(c: CapturedInputs, output: Any) -> CapturedInputs:
    """The block's output (a tensor, or a tuple whose first item is the hidden states) put in
    place of its hidden-states input (the first positional argument, else ``hidden_states``)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if c.args:
        return CapturedInputs((hidden,) + tuple(c.args[1:]), c.kwargs)
    if "hidden_states" in c.kwargs:
        return CapturedInputs((), {**c.kwargs, "hidden_states": hidden})
    raise RecipeError("sequential: a block was called without positional arguments or "
                      f"'hidden_states'; its keyword arguments are {sorted(c.kwargs)}")


def quantize_sequential(model: torch.nn.Module, plan: Plan, data: Iterable,
                        needs: dict[str, tuple[str, ...]], progress: bool = False) -> Report:
    """Quantize ``model`` in place by `plan`, block by block (see the module docstring).

    ``needs`` (planned layer -> "hessian" and/or "range", as `api.calibration_needs` gives it) says
    what to collect; a step whose layers need nothing is not calibrated. Returns `apply_blocks`'s
    `Report`; on failure every layer is restored.
    """
    if not needs:  # nothing to calibrate: block order does not matter
        return apply(model, plan, progress=progress)
    if data is None or isinstance(data, (torch.Tensor, dict)):
        raise RecipeError(f"sequential=True: calibration data must be a list of batches (pass "
                          f"data=...), found {type(data).__name__}")
    data = list(data)
    if not data:
        raise RecipeError("sequential=True: the calibration data is empty")
    stats_kinds = _kinds(plan, needs)
    list_name, count = find_blocks(model, plan.layers)
    before, blocks, after = split_steps(model, plan, list_name, count, data)
    state: dict[str, Any] = {"inputs": None, "done": -1}

    def block_stats(i: int, names: list[str]) -> dict[str, LayerStats]:
        if state["inputs"] is None:
            state["inputs"] = [without_caches(c) for c in
                               capture_inputs(model, data, f"{list_name}.0", progress=progress)]
        for j in range(state["done"] + 1, i):  # run the blocks quantized since: their outputs
            state["inputs"] = run_block(model.get_submodule(f"{list_name}.{j}"), state["inputs"])
        state["done"] = i - 1
        prefix = f"{list_name}.{i}."
        kinds, observers = stats_kinds(names)
        if not kinds:
            return {}
        wrapper = _BlockCall(model.get_submodule(f"{list_name}.{i}"))
        local = [f"block.{n[len(prefix):]}" for n in names]
        observers = {f"block.{n[len(prefix):]}": o for n, o in observers.items()}
        got = collect(wrapper, [(c,) for c in state["inputs"]], local, stats=kinds,
                      observer=observers, progress=False)
        return {n: got[loc] for n, loc in zip(names, local)}

    def stats_for(names: list[str]) -> dict[str, LayerStats]:
        index = next((i for i, b in enumerate(blocks) if b and b[0] == names[0]), None)
        if index is not None:
            return block_stats(index, names)
        kinds, observers = stats_kinds(names)
        state["inputs"] = None  # the blocks' activations are not needed any more
        return {} if not kinds else collect(model, data, names, stats=kinds, observer=observers, progress=progress)

    steps = [s for s in [before, *blocks, after] if s]
    return apply_blocks(model, plan, steps, stats_for, progress=progress)


def _kinds(plan: Plan, needs: dict[str, tuple[str, ...]]) -> Callable:
    """names -> (statistics to collect, observer per layer): ranges use the rule's observer."""
    def stats_kinds(names: list[str]) -> tuple[tuple[str, ...], dict[str, str]]:
        kinds = tuple(sorted({k for n in names for k in needs.get(n, ())}))
        observers = {n: (plan.layers[n].input_spec.observer if "range" in needs.get(n, ()) else "minmax")
                     for n in names}
        return kinds, observers
    return stats_kinds


def run_block(block: torch.nn.Module, inputs: list[CapturedInputs]) -> list[CapturedInputs]:
    """Each captured input run through ``block`` (in eval mode, no grad); the results are the
    next block's inputs."""
    out = []
    with _eval_mode(block), torch.no_grad():
        for c in inputs:
            out.append(next_inputs(c, block(*c.args, **c.kwargs)))
    return out

