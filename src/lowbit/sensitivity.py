"""Per-layer sensitivity: quantize one layer (or one repeated block) at a time, everything else in
float, and measure what the task loses, the layer's output SQNR and the bytes it saves.

The one-layer-at-a-time sensitivity analysis is the "partial quantization" study of Wu et al.,
"Integer Quantization for Deep Learning Inference: Principles and Empirical Evaluation" (arXiv
2004.09602, section 6.2): rank layers by the accuracy lost when only that layer is quantized.

How one unit is measured::

    float pass (once): task(model) -> base metric, while lowbit.calibrate.record_inputs keeps each
                       planned layer's float inputs (or `data` is run for them, when given)
    per unit:          plan (a Recipe with an exact-name rule) -> apply.applied (quantize, restore
                       on exit) -> task(model) -> drop = quality lost vs base (sign-corrected)
                       proxy: the layer's output SQNR on the cached float inputs (the layer alone
                       is run, not the model); optional timing of the layer vs its float twin

A task is any object with ``name``, ``metric``, ``higher_is_better`` and ``__call__(model) ->
dict`` holding ``metric`` (the `lowbit.tasks.Task` protocol).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import api
from .apply import applied
from .calibrate import call_model, record_inputs
from .calibrate.collect import _eval_mode
from .errors import RecipeError
from .eval.timing import interleaved
from .primitives.metrics import db_from_sums
from .recipe import Plan, Recipe, Rule
from .recipe import plan as plan_recipe
from .sequential import find_blocks
from .tasks import drop
from .textable import text_table

MAX_INPUT_ELEMENTS = 1 << 20  # float input values kept per layer for the SQNR proxy (4 MB)
TIME_ROUNDS = 15              # interleaved rounds when a unit is timed against its float twin
TIME_BUDGET_S = 0.3           # ... stopping early after this long (at least 3 rounds)


def check_task(task) -> None:
    """A task has ``name``, ``metric``, ``higher_is_better`` and is callable on a model."""
    missing = [a for a in ("name", "metric", "higher_is_better") if not hasattr(task, a)]
    if missing or not callable(task):
        raise RecipeError(f"a task needs attributes name, metric, higher_is_better and to be callable "
                          f"on a model (lowbit.tasks.Task); {type(task).__name__} lacks "
                          f"{missing or ['__call__']}")


def metric_of(task, model: torch.nn.Module) -> float:
    """Run ``task`` on ``model``; its ``metric`` value as a float (an error names a missing key)."""
    result = task(model)
    if not isinstance(result, dict) or task.metric not in result:
        raise RecipeError(f"task {task.name!r} must return a dict holding its metric "
                          f"{task.metric!r}, found {result!r:.200}")
    return float(result[task.metric])


@dataclass(frozen=True)
class UnitSensitivity:
    """One unit (a layer, or a block of layers quantized together) under one scheme."""
    name: str
    layers: tuple[str, ...]
    metric: float
    drop: float
    sqnr_db: float           # output SQNR on the cached float inputs (NaN: the layer was never called)
    float_bytes: int
    quant_bytes: int
    ms: float | None = None        # the quantized unit's time at `rows` rows (least of the rounds)
    float_ms: float | None = None  # its float twin's, in the same interleaved rounds

    @property
    def bytes_saved(self) -> int:
        return self.float_bytes - self.quant_bytes


@dataclass
class SensitivityReport:
    """Units ranked most sensitive first (largest drop; ties: lowest SQNR)."""
    task: str
    metric: str
    higher_is_better: bool
    scheme: str
    method: str
    base: float
    units: list[UnitSensitivity]
    skipped: dict[str, str] = field(default_factory=dict)
    blocks: bool = False
    rows: int | None = None  # row count the units were timed at (None: not timed)

    def unit(self, name: str) -> UnitSensitivity:
        return next(u for u in self.units if u.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units"] = [{**asdict(u), "layers": list(u.layers), "bytes_saved": u.bytes_saved}
                      for u in self.units]
        return d

    def to_json(self) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=1, sort_keys=True)

    def _rows(self) -> list[tuple]:
        timed = self.rows is not None
        return [(i + 1, u.name, f"{u.drop:+.4f}", f"{u.metric:.4f}", f"{u.sqnr_db:.1f}",
                 f"{u.bytes_saved / 1e3:.1f}") + ((_ms(u.ms), _ms(u.float_ms)) if timed else ())
                for i, u in enumerate(self.units)]

    def _headers(self) -> tuple[str, ...]:
        return ("rank", "block" if self.blocks else "layer", "drop", self.metric, "SQNR dB",
                "KB saved") + (("ms", "float ms") if self.rows is not None else ())

    def _title(self) -> str:
        way = "higher is better" if self.higher_is_better else "lower is better"
        timed = f"; times at {self.rows} rows" if self.rows is not None else ""
        return (f"sensitivity of {len(self.units)} {'blocks' if self.blocks else 'layers'} to "
                f"{self.scheme} ({self.method}) on task {self.task}: float {self.metric} "
                f"{self.base:.4f} ({way}); drop = quality lost with only that unit quantized{timed}")

    def __str__(self) -> str:
        headers = self._headers()
        out = [self._title(), text_table(headers, self._rows(), [False, False] + [True] * (len(headers) - 2))]
        out += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(out)

    def plot(self, path) -> "Path":
        """A PNG of the ranked drops (`tune_plot.plot_sensitivity`); returns its path."""
        from .tune_plot import plot_sensitivity
        return plot_sensitivity(self, path)

    def to_markdown(self) -> str:
        headers = self._headers()
        lines = [self._title(), "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self._rows()]
        lines += [f"- skipped `{n}`: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines) + "\n"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def json_safe(obj):
    """JSON has no NaN or infinity: they are written as null / "inf" / "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def sensitivity(model: torch.nn.Module, scheme: str, task, targets: Sequence[str] | None = None,
                data: Iterable | None = None, method: str = "rtn", blocks: bool = False,
                progress: bool = True, rows: int | None = None) -> SensitivityReport:
    """Quantize each planned layer (``blocks=True``: each repeated block's layers together) alone
    under ``scheme`` and ``method``, measure ``task`` on the model and the layer's output SQNR; rank.

    ``targets`` as in `lowbit.quantize` (None: every Linear but the output head). ``data``
    (batches) feeds the SQNR proxy and the calibration of methods that need it (gptq, static
    inputs); without it the proxy uses the inputs the task's own float run gave. ``rows``: also time
    each unit against its float twin on that many input rows (what `lowbit.tune` minimizes for
    ``objective="latency"``). The model is left as it was.
    """
    check_task(task)
    the_plan = api.plan(model, scheme, targets, method=method)
    base, inputs = float_pass(model, task, list(the_plan.layers), data)
    stats = api.calibrate_for(model, the_plan, data, progress=False)
    return profile(model, the_plan, task, base, inputs, stats, blocks=blocks, progress=progress,
                   rows=rows, scheme=str(scheme))


def float_pass(model: torch.nn.Module, task, names: list[str], data: Iterable | None
               ) -> tuple[float, dict[str, list[torch.Tensor]]]:
    """(the float model's metric, each named layer's recorded float inputs) from one float run of
    ``data`` (when given) or of the task itself."""
    with record_inputs(model, names, MAX_INPUT_ELEMENTS) as recorded:
        if data is None:
            base = metric_of(task, model)
        else:
            with _eval_mode(model), torch.inference_mode():
                for i, batch in enumerate(data):
                    call_model(model, batch, i)
    if data is not None:
        base = metric_of(task, model)
    return base, recorded


def units_of(model: torch.nn.Module, names: list[str], blocks: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(unit name, its layers): one unit per layer, or per child of the model's longest ModuleList
    of planned layers (``blocks``), the layers outside the blocks one unit each."""
    if not blocks:
        return [(n, (n,)) for n in names]
    list_name, count = find_blocks(model, names)
    units = [(f"{list_name}.{i}", tuple(n for n in names if n.startswith(f"{list_name}.{i}.")))
             for i in range(count)]
    inside = {n for _, ls in units for n in ls}
    return [u for u in units if u[1]] + [(n, (n,)) for n in names if n not in inside]


def unit_plan(the_plan: Plan, layers: Sequence[str], model: torch.nn.Module) -> Plan:
    """The plan that quantizes exactly ``layers``, each with its rule in ``the_plan``, through a
    Recipe of exact-name rules (no output-head skip: ``the_plan`` already decided that)."""
    groups: dict[Rule, list[str]] = {}
    for n in layers:
        groups.setdefault(the_plan.layers[n], []).append(n)
    rules = tuple(dataclasses.replace(r, targets=tuple(ns), ignore=()) for r, ns in groups.items())
    return plan_recipe(model, Recipe(rules, skip_output_head=False))


def profile(model: torch.nn.Module, the_plan: Plan, task, base: float,
            inputs: dict[str, list[torch.Tensor]], stats, blocks: bool = False, progress: bool = True,
            rows: int | None = None, scheme: str = "") -> SensitivityReport:
    """Measure every unit of ``the_plan`` (see `sensitivity`); ``inputs`` and ``base`` come from
    `float_pass`, ``stats`` from `api.calibrate_for` on the float model."""
    units = units_of(model, list(the_plan.layers), blocks)
    rules = {the_plan.layers[n].scheme.name for n in the_plan.layers}
    methods = {the_plan.layers[n].method for n in the_plan.layers}
    results = []
    bar = tqdm(units, desc=f"sensitivity {scheme or '/'.join(sorted(rules))}", unit="block" if blocks else "layer",
               disable=not progress, file=sys.stderr)
    for name, layers in bar:
        results.append(_measure(model, the_plan, task, base, inputs, stats, name, layers, rows))
    results.sort(key=lambda u: (-u.drop, u.sqnr_db if not math.isnan(u.sqnr_db) else math.inf, u.name))
    return SensitivityReport(task.name, task.metric, bool(task.higher_is_better),
                             scheme or "/".join(sorted(rules)), "/".join(sorted(methods)), base,
                             results, dict(the_plan.skipped), blocks, rows)


def _measure(model, the_plan: Plan, task, base: float, inputs, stats, name: str,
             layers: tuple[str, ...], rows: int | None) -> UnitSensitivity:
    floats = {n: model.get_submodule(n) for n in layers}
    sub = unit_plan(the_plan, layers, model)
    with applied(model, sub, stats) as report:
        value = metric_of(task, model)
        quants = {n: model.get_submodule(n) for n in layers}
        signal, noise = _output_error(floats, quants, inputs)
        ms, float_ms = _time_unit(floats, quants, inputs, rows) if rows else (None, None)
    db = db_from_sums(signal, noise) if signal or noise else math.nan
    return UnitSensitivity(name, layers, value, drop(task, base, value), db,
                           report.float_bytes, report.quant_bytes, ms, float_ms)


def _output_error(floats: dict, quants: dict, inputs: dict[str, list[torch.Tensor]]) -> tuple[float, float]:
    """Sums of squares of the float outputs and of the quantized-minus-float outputs, over the
    units' layers run alone on their recorded float inputs."""
    signal = noise = 0.0
    with torch.inference_mode():
        for n, f in floats.items():
            for x in inputs.get(n, []):
                ref, out = f(x).double(), quants[n](x).double()
                signal += ref.square().sum().item()
                noise += (out - ref).square().sum().item()
    return signal, noise


def _time_unit(floats: dict, quants: dict, inputs: dict, rows: int) -> tuple[float | None, float | None]:
    """Least ms over interleaved rounds of the unit's quantized layers vs their float twins, each
    Linear on ``rows`` seeded random rows (other layers on their first recorded input)."""
    gen = torch.Generator().manual_seed(0)
    xs = {}
    for n, f in floats.items():
        if isinstance(f, torch.nn.Linear):
            xs[n] = torch.randn(rows, f.in_features, generator=gen)
        elif inputs.get(n):
            xs[n] = inputs[n][0]
    if not xs:
        return None, None
    t = interleaved({"q": lambda: [quants[n](x) for n, x in xs.items()],
                     "f": lambda: [floats[n](x) for n, x in xs.items()]},
                    rounds=TIME_ROUNDS, budget_s=TIME_BUDGET_S)
    return t["q"].min_ms, t["f"].min_ms


__all__ = ["SensitivityReport", "UnitSensitivity", "check_task", "float_pass", "metric_of",
           "profile", "sensitivity", "units_of"]
