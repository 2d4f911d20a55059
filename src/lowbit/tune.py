"""Automatic mixed precision under a quality budget: choose, per layer, one of the candidate schemes
(or float) so that the model is smallest (``objective="bytes"``) or fastest (``"latency"``) while
the task loses at most ``max_drop``.

1. Profile: `lowbit.sensitivity` of every candidate (one float pass; each layer quantized alone).
2. Choose: a multiple-choice knapsack over the layers, solved exactly by dynamic programming on the
   budget cut into `DROP_STEPS` steps. A layer's options are float (drop 0) and each candidate that
   supports it; an option's weight is its measured one-layer drop (negative drops, i.e. gains,
   count as 0; rounded up to a step, so the estimate never undercounts), its cost its weight bytes
   or its time on `DEFAULT_ROWS` rows. The estimate of a mix's drop is the sum of its layers' drops
   (additive, as in the sensitivity-guided mixed precision of HAWQ, Dong et al., arXiv 1905.03696,
   and of Wu et al., arXiv 2004.09602, section 6.2).
3. Verify the chosen mix end to end on the task. While its measured drop exceeds the budget,
   repair: the quantized layer with the largest measured drop per unit of cost saved is raised to
   its cheapest option with a smaller drop (float when there is none), and the mix is measured again.

The result is a `Recipe` of exact-name rules (`TuneReport.recipe`), which `lowbit quantize --recipe`
applies.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from . import api
from .apply import applied
from .errors import RecipeError
from .recipe import Recipe, Rule
from .recipe import plan as plan_recipe
from .sensitivity import SensitivityReport, check_task, float_pass, json_safe, metric_of, profile
from .tasks import drop
from .spec import parse
from .textable import text_table

DEFAULT_CANDIDATES = ("w8", "w8a8", "w4g128", "w4g32", "w3g128")
OBJECTIVES = ("bytes", "latency")
FLOAT = "float"
DROP_STEPS = 1000    # the budget's resolution in the knapsack
DEFAULT_ROWS = 256   # input rows each layer is timed at for objective="latency"


@dataclass(frozen=True)
class Option:
    """One choice for one layer: its scheme (or "float"), measured drop, bytes and time."""
    scheme: str
    drop: float
    bytes: int
    ms: float | None = None

    def cost(self, objective: str) -> float:
        return float(self.bytes) if objective == "bytes" else (math.inf if self.ms is None else self.ms)


@dataclass
class TuneReport:
    """The chosen mix, what it costs and what it measured (see the module docstring)."""
    task: str
    metric: str
    objective: str
    max_drop: float
    base: float
    choice: dict[str, str]                 # layer -> scheme or "float"
    options: dict[str, list[Option]]       # layer -> its options (float first)
    verified_metric: float
    verified_drop: float
    estimated_drop: float
    repairs: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> {candidate: reason}
    method: str = "rtn"
    rows: int | None = None
    profiles: dict[str, SensitivityReport] = field(default_factory=dict)

    def chosen(self, layer: str) -> Option:
        return next(o for o in self.options[layer] if o.scheme == self.choice[layer])

    @property
    def recipe(self) -> Recipe:
        return recipe_for(self.choice, self.method)

    def total(self, what: str, scheme: str | None = None) -> float:
        """Sum of ``what`` ("bytes" or "ms") over the layers for the chosen mix, or for ``scheme``
        on every layer that supports it (the others float)."""
        total = 0.0
        for layer, opts in self.options.items():
            by = {o.scheme: o for o in opts}
            o = self.chosen(layer) if scheme is None else by.get(scheme, by[FLOAT])
            total += o.bytes if what == "bytes" else (o.ms or 0.0)
        return total

    def within_budget(self) -> bool:
        return self.verified_drop <= self.max_drop

    def mix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.choice.values():
            counts[s] = counts.get(s, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "objective": self.objective,
                "max_drop": self.max_drop, "base": self.base, "method": self.method, "rows": self.rows,
                "verified_metric": self.verified_metric, "verified_drop": self.verified_drop,
                "estimated_drop": self.estimated_drop, "within_budget": self.within_budget(),
                "choice": self.choice, "mix": self.mix(), "repairs": self.repairs, "skipped": self.skipped,
                "bytes": {"mix": self.total("bytes"), FLOAT: self.total("bytes", FLOAT),
                          **{s: self.total("bytes", s) for s in self.candidates()}},
                "ms": {"mix": self.total("ms"), FLOAT: self.total("ms", FLOAT),
                       **{s: self.total("ms", s) for s in self.candidates()}} if self.rows else None,
                "options": {n: [o.__dict__ for o in opts] for n, opts in self.options.items()},
                "recipe": json.loads(self.recipe.to_json())}

    def candidates(self) -> list[str]:
        return list(dict.fromkeys(o.scheme for opts in self.options.values() for o in opts[1:]))

    def to_json(self) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=1, sort_keys=True)

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(what, bytes, ms) for the mix, float and each candidate used uniformly."""
        timed = self.rows is not None
        rows = [("mix", self.total("bytes"), self.total("ms") if timed else None),
                ("float", self.total("bytes", FLOAT), self.total("ms", FLOAT) if timed else None)]
        rows += [(f"uniform {s}", self.total("bytes", s), self.total("ms", s) if timed else None)
                 for s in self.candidates()]
        return [(w, f"{b / 1e6:.3f}", "-" if m is None else f"{m:.2f}") for w, b, m in rows]

    def _lines(self) -> list[str]:
        mix = ", ".join(f"{s} x{k}" for s, k in self.mix().items())
        ok = "within" if self.within_budget() else "OVER"
        return [f"tune ({self.objective}) on task {self.task}: float {self.metric} {self.base:.4f}; "
                f"budget: drop <= {self.max_drop:.4f}",
                f"chosen mix: {mix}",
                f"verified {self.metric} {self.verified_metric:.4f}: drop {self.verified_drop:+.4f} ({ok} "
                f"budget; estimated {self.estimated_drop:+.4f}); {len(self.repairs)} repair(s)"]

    def __str__(self) -> str:
        head = ("weights", "MB", f"ms at {self.rows} rows" if self.rows else "ms")
        layers = text_table(("layer", "choice", "one-layer drop", "KB"),
                            [(n, s, f"{self.chosen(n).drop:+.4f}", f"{self.chosen(n).bytes / 1e3:.1f}")
                             for n, s in self.choice.items()], (False, False, True, True))
        out = self._lines() + [text_table(head, self.summary_rows(), (False, True, True)), layers]
        out += [f"  repair: {r}" for r in self.repairs]
        out += [f"  {n}: {c} not possible ({why})" for n, d in self.skipped.items() for c, why in d.items()]
        return "\n".join(out)

    def plot(self, path) -> "Path":
        """A PNG of the chosen mix and its bytes (`tune_plot.plot_tune`); returns its path."""
        from .tune_plot import plot_tune
        return plot_tune(self, path)

    def to_markdown(self) -> str:
        lines = [f"{line}  " for line in self._lines()] + ["", "| weights | MB | ms |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.summary_rows()]
        lines += ["", "| layer | choice | one-layer drop | KB |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {s} | {self.chosen(n).drop:+.4f} | {self.chosen(n).bytes / 1e3:.1f} |"
                  for n, s in self.choice.items()]
        lines += [f"- repair: {r}" for r in self.repairs]
        return "\n".join(lines) + "\n"


def recipe_for(choice: dict[str, str], method: str = "rtn") -> Recipe:
    """One exact-name rule per scheme used (layers kept float are not named)."""
    by: dict[str, list[str]] = {}
    for layer, scheme in choice.items():
        if scheme != FLOAT:
            by.setdefault(scheme, []).append(layer)
    return Recipe(tuple(Rule(tuple(ls), s, method=method) for s, ls in by.items()), skip_output_head=False)


def tune(model: torch.nn.Module, task, max_drop: float = 0.01,
         candidates: Sequence[str] = DEFAULT_CANDIDATES, objective: str = "bytes",
         data: Iterable | None = None, targets: Sequence[str] | None = None, method: str = "rtn",
         rows: int = DEFAULT_ROWS, progress: bool = True,
         profiles: dict[str, SensitivityReport] | None = None) -> TuneReport:
    """Choose a scheme (or float) per layer minimizing ``objective`` subject to the task's drop
    staying within ``max_drop``; verify the mix on the task and repair until it does (see the
    module docstring). ``targets``/``method``/``data`` as in `lowbit.quantize`; ``profiles``
    (candidate -> `SensitivityReport` from an earlier call's ``report.profiles``) skips profiling.
    Candidates a layer does not support are left out for it, with the reason in ``report.skipped``.
    The model is left as it was; ``report.recipe`` is the mix."""
    check_task(task)
    candidates = _check_args(max_drop, candidates, objective)
    plans = {c: api.plan(model, c, targets, method=method, allow_empty=True) for c in candidates}
    layers = list(dict.fromkeys(n for p in plans.values() for n in p.layers))
    if not layers:
        raise RecipeError(f"no layer can take any of the candidates {list(candidates)}: "
                          f"{_reasons(plans)}")
    timed = rows if objective == "latency" else None
    if profiles is None or any(c not in profiles for c in candidates):
        profiles = _profiles(model, task, plans, layers, data, timed, progress)
    base = next(iter(profiles.values())).base
    options = {n: layer_options(n, profiles, candidates) for n in layers}
    choice = choose(options, max_drop, objective)
    report = TuneReport(task.name, task.metric, objective, max_drop, base, choice, options,
                        math.nan, math.nan, _estimate(options, choice), method=method, rows=timed,
                        skipped=_skipped(plans, layers), profiles=profiles)
    _verify_and_repair(model, task, report, data, progress)
    return report


def _check_args(max_drop: float, candidates: Sequence[str], objective: str) -> tuple[str, ...]:
    if objective not in OBJECTIVES:
        raise RecipeError(f"objective must be one of {OBJECTIVES}, found {objective!r}")
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise RecipeError(f"max_drop must be a finite number >= 0, found {max_drop!r}")
    candidates = (candidates,) if isinstance(candidates, str) else tuple(candidates)
    if not candidates or len(set(candidates)) != len(candidates) or FLOAT in candidates:
        raise RecipeError(f"candidates must be distinct scheme names (float is always an option), "
                          f"found {list(candidates)}")
    for c in candidates:
        parse(c)  # a typo names the valid forms
    return candidates


def _profiles(model, task, plans, layers, data, rows, progress) -> dict[str, SensitivityReport]:
    base, inputs = float_pass(model, task, layers, data)
    out = {}
    for c, p in plans.items():
        if p.layers:
            stats = api.calibrate_for(model, p, data, progress=False)
            out[c] = profile(model, p, task, base, inputs, stats, progress=progress, rows=rows, scheme=c)
    return out


def layer_options(layer: str, profiles: dict[str, SensitivityReport],
                  candidates: Sequence[str]) -> list[Option]:
    """float first (drop 0, the float weight's bytes, the least float time measured), then each
    candidate the layer was profiled under (negative drops count as 0)."""
    units = {c: next((u for u in profiles[c].units if u.name == layer), None)
             for c in candidates if c in profiles}
    units = {c: u for c, u in units.items() if u is not None}
    some = next(iter(units.values()))
    float_ms = [u.float_ms for u in units.values() if u.float_ms is not None]
    opts = [Option(FLOAT, 0.0, some.float_bytes, min(float_ms) if float_ms else None)]
    return opts + [Option(c, max(u.drop, 0.0), u.quant_bytes, u.ms) for c, u in units.items()]


def choose(options: dict[str, list[Option]], max_drop: float, objective: str) -> dict[str, str]:
    """The least-cost choice per layer whose summed drops (each rounded up to a step of
    ``max_drop / DROP_STEPS``) stay within ``max_drop``: exact dynamic programming over the layers."""
    step = max_drop / DROP_STEPS if max_drop > 0 else None
    cap = DROP_STEPS if step else 0
    best = [0.0] * (cap + 1)  # best[w]: least cost of the layers so far with summed weight <= w
    picks: list[list[int]] = []
    for layer, opts in options.items():
        weights = [0 if o.drop <= 0 else (math.ceil(o.drop / step - 1e-9) if step else cap + 1) for o in opts]
        costs = [o.cost(objective) for o in opts]
        new, pick = [math.inf] * (cap + 1), [0] * (cap + 1)
        for w in range(cap + 1):
            for i, (wt, c) in enumerate(zip(weights, costs)):
                if wt <= w and best[w - wt] + c < new[w]:
                    new[w], pick[w] = best[w - wt] + c, i
        best = new
        picks.append(pick)
    choice, w = {}, cap
    for (layer, opts), pick in reversed(list(zip(options.items(), picks))):
        i = pick[w]
        choice[layer] = opts[i].scheme
        w -= 0 if opts[i].drop <= 0 else math.ceil(opts[i].drop / step - 1e-9)
    return {layer: choice[layer] for layer in options}


def _estimate(options: dict[str, list[Option]], choice: dict[str, str]) -> float:
    return sum(next(o for o in options[n] if o.scheme == s).drop for n, s in choice.items())


def _verify_and_repair(model, task, report: TuneReport, data, progress: bool) -> None:
    """Measure the mix on the task; raise the worst layer and measure again until within budget."""
    while True:
        report.verified_metric = measure_mix(model, task, report.choice, report.method, data)
        report.verified_drop = drop(task, report.base, report.verified_metric)
        if report.within_budget() or all(s == FLOAT for s in report.choice.values()):
            return
        layer, new = _worst(report)
        line = (f"verified drop {report.verified_drop:+.4f} > {report.max_drop:.4f}: {layer} "
                f"{report.choice[layer]} -> {new}")
        if progress:
            print(f"lowbit tune: {line}", file=sys.stderr)
        report.repairs.append(line)
        report.choice[layer] = new
        report.estimated_drop = _estimate(report.options, report.choice)


def measure_mix(model, task, choice: dict[str, str], method: str, data) -> float:
    """The task's metric with ``choice`` applied (through plan/apply; the model is restored)."""
    recipe = recipe_for(choice, method)
    if not recipe.rules:
        return metric_of(task, model)
    the_plan = plan_recipe(model, recipe)
    with applied(model, the_plan, api.calibrate_for(model, the_plan, data, progress=False)):
        return metric_of(task, model)


def _worst(report: TuneReport) -> tuple[str, str]:
    """(layer, its raised option): the quantized layer with the largest measured drop per cost
    saved (a layer that saves nothing first), raised to its cheapest option with a smaller drop."""
    def badness(layer: str) -> tuple[float, float]:
        o = report.chosen(layer)
        saved = report.options[layer][0].cost(report.objective) - o.cost(report.objective)
        return (math.inf if saved <= 0 else o.drop / saved, o.drop)
    layer = max((n for n, s in report.choice.items() if s != FLOAT), key=badness)
    current = report.chosen(layer)
    better = [o for o in report.options[layer] if o.drop < current.drop and o.scheme != FLOAT]
    cheapest = min(better, key=lambda o: o.cost(report.objective), default=None)
    return layer, FLOAT if cheapest is None else cheapest.scheme


def _skipped(plans: dict, layers: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for c, p in plans.items():
        for n, why in p.skipped.items():
            if n in layers:
                out.setdefault(n, {})[c] = why
    return out


def _reasons(plans: dict) -> str:
    return "; ".join(f"{c}: " + ", ".join(f"{n} ({w})" for n, w in list(p.skipped.items())[:3])
                     for c, p in plans.items())


__all__ = ["DEFAULT_CANDIDATES", "OBJECTIVES", "Option", "TuneReport", "choose", "layer_options",
           "measure_mix", "recipe_for", "tune"]
