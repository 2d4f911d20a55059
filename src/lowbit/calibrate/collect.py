"""Scoped collection: run a model on calibration data and gather what each named layer receives.

Hooks live only inside `collect` and `run_until`: they are registered in a ``try`` and removed in
its ``finally``, so a model that raises mid-batch keeps no hook. The model runs in eval mode
(each module's ``training`` flag is restored afterwards) and is otherwise untouched: no parameter,
buffer or attribute is written.

A batch is a Tensor (called as ``model(batch)``), a tuple or list (``model(*batch)``) or a dict
(``model(**batch)``, as transformers models take).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..algorithms.stats import LayerStats
from .hessian import HessianAccumulator, HessianError, gram
from .observers import ObserverConfig, ObserverError, as_config, make_observer
from ..errors import LowbitError

STATS = ("range", "hessian")


class CalibrationError(LowbitError):
    """Bad calibration arguments or data; the message names the layer, batch or argument."""


@dataclass(frozen=True)
class CapturedInputs:
    """The positional and keyword arguments one call of a submodule received."""
    args: tuple
    kwargs: dict


def call_model(model: Callable, batch: Any, index: int = 0) -> Any:
    """Run ``model`` on one batch: Tensor -> positional, tuple/list -> ``*args``, dict -> ``**kwargs``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    kind = f"{type(batch).__module__}.{type(batch).__qualname__}"
    raise CalibrationError(f"calibration batch {index} is a {kind}; "
                           "a batch must be a Tensor (positional), a tuple/list (positional args) "
                           "or a dict (keyword args)")


def collect(model: torch.nn.Module, data: Iterable, layer_names: Sequence[str],
            stats: Sequence[str] = STATS,
            observer: "str | ObserverConfig | Mapping[str, str | ObserverConfig]" = "minmax",
            progress: bool = True,
            input_scale: Mapping[str, torch.Tensor] | None = None) -> dict[str, LayerStats]:
    """Run ``model`` on every batch of ``data`` under ``torch.inference_mode()`` and return, for
    each named submodule, the range of its first input (``stats`` has "range"; ``observer`` is a
    name, an `ObserverConfig`, or a dict layer name -> either) and/or its input Hessian
    (``stats`` has "hessian"), with the number of input rows (tokens) it saw.
    ``input_scale`` (layer -> ``s`` (in_features,)): that layer's statistics are of ``x * (1 / s)``,
    the input a run-time smoothed layer quantizes (`nn.QLinearA8`).
    """
    stats = _check_stats(stats)
    modules = _resolve(model, layer_names)
    observers = {n: make_observer(_observer_for(observer, n)) for n in modules} if "range" in stats else {}
    hessians = _SharedHessians() if "hessian" in stats else None
    samples = dict.fromkeys(modules, 0)
    inv = {n: s.detach().float().reciprocal() for n, s in (input_scale or {}).items()}

    def make_hook(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_input(name, args, kwargs)
            x = x * inv[name] if name in inv else x  # (..., K) * (K,)
            try:
                if name in observers:
                    observers[name].update(x)
                if hessians is not None:
                    hessians.add(name, x)
            except (ObserverError, HessianError) as exc:
                raise CalibrationError(f"layer {name!r}: {exc}") from exc
            samples[name] += x.numel() // max(1, x.shape[-1]) if x.dim() else 1
        return hook

    with _eval_mode(model), _hooks(modules, make_hook), torch.inference_mode():
        _run(model, data, progress, _StopAfter(modules))
        if hessians is not None:
            hessians.flush()
    unseen = [n for n, k in samples.items() if k == 0]
    if unseen:
        raise CalibrationError(f"layers never called during calibration (no inputs seen): {unseen}")
    done = hessians.take() if hessians is not None else {}
    return {n: LayerStats(observers[n].range() if n in observers else None, done.get(n), samples[n])
            for n in modules}


class _SharedHessians:
    """The layers' Hessian sums, one per group of layers fed the same tensors.

    A transformer's q/k/v projections (and gate/up) receive one tensor on every call: one
    ``X^T X`` is computed for the group (`gram`) and added to one sum that the group's layers
    share (`HessianAccumulator`: float64, upper triangle), so SmolLM2's 210 layers hold 120 sums,
    0.4 GiB (one full float64 matrix per layer was 1.0 GiB). A group splits
    (the sum copied) the first time its layers are fed different tensors, or the same tensor a
    different number of times, so every layer's Hessian is exactly that of its own inputs.

    Consecutive hook calls with the same tensor (the same object, its values unchanged) form one
    feed; `add` keeps it pending, with its product, until a different tensor arrives or `flush`.
    """

    def __init__(self) -> None:
        self.owner: dict[str, HessianAccumulator] = {}  # layer -> the sum it shares
        self.members: dict[HessianAccumulator, set[str]] = {}  # sum -> the layers sharing it
        self.pending: dict[str, Any] | None = None  # the current feed: x, a copy, its gram, names

    def add(self, name: str, x: torch.Tensor) -> None:
        p = self.pending
        if p is None or not _same_input(x, p):
            self.flush()
            self.pending = p = {"x": x, "copy": x.detach().clone(), "gram": gram(x), "names": []}
        p["names"].append(name)

    def flush(self) -> None:
        p, self.pending = self.pending, None
        if p is None:
            return
        calls = Counter(p["names"])
        groups: dict[tuple, list[str]] = {}  # (sum or None for new layers, calls) -> layers
        for n, k in calls.items():
            groups.setdefault((self.owner.get(n), k), []).append(n)
        for (acc, k), names in groups.items():
            if acc is None or self.members[acc] != set(names):  # new layers, or a split
                old, acc = acc, (HessianAccumulator() if acc is None else acc.copy())
                for n in names:
                    self.owner[n] = acc
                    if old is not None:
                        self.members[old].discard(n)
                self.members[acc] = set(names)
            try:
                for _ in range(k):
                    acc.add_gram(*p["gram"])
            except HessianError as exc:
                raise CalibrationError(f"layer(s) {sorted(names)}: {exc}") from exc

    def take(self) -> dict[str, torch.Tensor]:
        """Layer -> its Hessian, float32 (`HessianAccumulator.take`: one sum at a time, finished
        in float64, then rounded once); the layers of one group get the same tensor object."""
        out: dict[str, torch.Tensor] = {}
        for acc, names in self.members.items():
            if names:
                h = acc.take(torch.float32)
                out.update(dict.fromkeys(names, h))
        self.owner.clear()
        self.members.clear()
        return out


def _same_input(x: torch.Tensor, last: dict) -> bool:
    """``x`` is the tensor the previous hook saw, with the same values (not changed in place)."""
    return x is last["x"] and torch.equal(x, last["copy"])


class _StopAfter:
    """Ends each batch's forward once every collected layer has run (the output head and the
    rest of the model after the last collected layer compute nothing `collect` reads). The first
    batch runs whole and counts each layer's calls; each later batch stops, through a forward
    hook raising `_StopForward`, when every layer has been called that many times. (A model whose
    call counts grow from batch to batch would lose the extra calls; transformer blocks and
    Linears are called the same number of times on every batch.)"""

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self.modules, self.expected = modules, None
        self.calls = dict.fromkeys(modules, 0)

    def batch(self, index: int) -> contextlib.AbstractContextManager:
        self.calls = dict.fromkeys(self.modules, 0)
        return _hooks(self.modules, self._hook, post=True)

    def end_batch(self) -> None:
        if self.expected is None:
            self.expected = dict(self.calls)

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.calls[name] += 1
            if self.expected is not None and all(self.calls[n] >= k for n, k in self.expected.items()):
                raise _StopForward
        return hook


def run_until(model: torch.nn.Module, batch: Any, module_name: str) -> CapturedInputs:
    """Run ``model`` on one batch until submodule ``module_name`` is called; return its arguments
    and stop the forward there (what block-by-block GPTQ feeds each block).

    Runs under ``torch.no_grad()``, not inference mode, so the captured tensors are ordinary
    tensors that later code may feed to a block whose weights it then edits.
    """
    target = _resolve(model, [module_name])[module_name]
    captured: list[CapturedInputs] = []

    def make_hook(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(CapturedInputs(tuple(args), dict(kwargs)))
            raise _StopForward
        return hook

    with _eval_mode(model), _hooks({module_name: target}, make_hook), torch.no_grad():
        try:
            call_model(model, batch)
        except _StopForward:
            pass
    if not captured:
        raise CalibrationError(f"the forward finished without calling {module_name!r}")
    return captured[0]


def capture_inputs(model: torch.nn.Module, data: Iterable, module_name: str,
                   progress: bool = False) -> list[CapturedInputs]:
    """`run_until` on every batch of ``data``: the inputs ``module_name`` receives, one per batch."""
    return [run_until(model, b, module_name)
            for b in tqdm(data, desc="capture", disable=not progress, unit="batch", file=sys.stderr)]


@contextlib.contextmanager
def record_inputs(model: torch.nn.Module, layer_names: Sequence[str],
                  max_elements: int = 1 << 20) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the with-block, every call of a named submodule appends a detached copy of its first
    input to ``recorded[name]`` (the dict yielded), until that layer holds ``max_elements`` values;
    the hooks are gone when the block exits. Whatever runs the model inside the block (calibration
    data, a task) feeds it; one float run gives every layer's inputs (`lowbit.sensitivity`)."""
    modules = _resolve(model, layer_names)
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    held = dict.fromkeys(modules, 0)

    def make_hook(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if held[name] < max_elements:
                x = _first_input(name, args, kwargs)
                recorded[name].append(x.detach().clone())
                held[name] += x.numel()
        return hook

    with _hooks(modules, make_hook):
        yield recorded


class _StopForward(BaseException):
    """Raised by `run_until`'s hook and caught there. A BaseException, so that a model's own
    ``except Exception`` cannot swallow it and run on."""


def _run(model: torch.nn.Module, data: Iterable, progress: bool, stop: "_StopAfter | None" = None) -> None:
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)):
        raise CalibrationError(f"data must be an iterable of batches, found a single "
                               f"{type(data).__name__}; wrap it in a list or use "
                               "lowbit.calibration.batches_from_tensors")
    for i, batch in enumerate(tqdm(data, desc="calibrate", disable=not progress, unit="batch",
                                   file=sys.stderr)):
        try:
            if stop is None:
                call_model(model, batch, i)
                continue
            with stop.batch(i):
                call_model(model, batch, i)
            stop.end_batch()
        except _StopForward:
            pass
        except Exception as exc:
            exc.add_note(f"lowbit.calibrate: while running calibration batch {i}")
            raise


@contextlib.contextmanager
def _hooks(modules: Mapping[str, torch.nn.Module], make_hook: Callable,
           post: bool = False) -> Iterator[None]:
    handles = []
    try:
        for name, m in modules.items():
            register = m.register_forward_hook if post else m.register_forward_pre_hook
            handles.append(register(make_hook(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, was in flags:
            m.training = was


def _resolve(model: torch.nn.Module, layer_names: Sequence[str]) -> dict[str, torch.nn.Module]:
    if isinstance(layer_names, str) or not layer_names:
        raise CalibrationError("layer_names must be a non-empty list of submodule names, "
                               f"found {layer_names!r}")
    named = dict(model.named_modules())
    missing = [n for n in layer_names if n not in named]
    if missing:
        some = [n for n in named if n][:8]
        raise CalibrationError(f"no submodule named {missing} in {type(model).__name__}; "
                               f"submodules include {some}")
    return {n: named[n] for n in dict.fromkeys(layer_names)}


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    stats = (stats,) if isinstance(stats, str) else tuple(stats)
    bad = [s for s in stats if s not in STATS]
    if bad or not stats:
        raise CalibrationError(f"stats must be a non-empty subset of {STATS}, found {stats!r}")
    return stats


def _observer_for(observer: Any, name: str) -> ObserverConfig:
    if isinstance(observer, Mapping):
        if name not in observer:
            raise CalibrationError(f"no observer given for layer {name!r}; the observer dict names "
                                   f"{sorted(observer)}")
        return as_config(observer[name])
    return as_config(observer)


def _first_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"layer {name!r} was called without a tensor as its first input "
                               f"(found {type(x).__name__}); only such layers can be calibrated")
    return x
