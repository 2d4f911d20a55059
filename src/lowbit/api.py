"""The one-line API: `quantize` a model in place under a scheme or a recipe."""
from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Iterable, Sequence

import torch

from . import guardrail
from .algorithms import NEEDS_DATA, LayerStats
from .apply import Report, apply
from .calibrate import collect
from .errors import RecipeError
from .io.format import tensors_sha256
from .recipe import Plan, Recipe, Rule
from .recipe import plan as plan_recipe
from .smooth import materialize
from .smooth import smooth as smooth_model
from .smooth import smooth_at_runtime, smooth_with_hessians
from .spec import QuantSpec, Scheme

DEFAULT_TARGETS = ("Linear",)


def make_recipe(scheme: "str | QuantSpec | Scheme | Recipe", targets: Sequence[str] | None = None,
                ignore: Sequence[str] = (), method: str = "rtn", method_options: dict | None = None,
                group_fallback: bool = False) -> Recipe:
    """A scheme plus targets/ignore -> a one-rule Recipe. Default targets (``targets=None``): every
    Linear except the model's output head; naming targets yourself quantizes exactly what they match.
    ``group_fallback``: see `Recipe` (a smaller group where the scheme's does not divide a layer)."""
    if isinstance(scheme, Recipe):
        if targets is not None or ignore or method_options:
            raise RecipeError("pass targets/ignore/method options inside the Recipe's rules, not next to it")
        return dataclasses.replace(scheme, group_fallback=True) if group_fallback else scheme
    if targets is not None and not isinstance(targets, str) and len(targets) == 0:
        raise RecipeError("targets is empty: pass targets=None for the default (every Linear but "
                          "the output head), or name what to quantize")
    rule = Rule(DEFAULT_TARGETS if targets is None else targets, scheme, ignore, method,
                options=tuple((method_options or {}).items()))
    return Recipe((rule,), skip_output_head=targets is None, group_fallback=group_fallback)


def source_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the float model's state (meta tensors skipped), as `io.format` hashes files."""
    return tensors_sha256({k: t for k, t in model.state_dict().items() if not t.is_meta})


def with_embeddings(scheme, targets, ignore, embeddings: str | None, method: str = "rtn",
                    method_options: dict | None = None):
    """(scheme, targets, ignore, method, method_options) with an Embedding rule added when
    ``embeddings`` names a scheme (the one recipe ``lowbit quantize --embeddings`` and
    `quantize_checkpoint` build): the method and its options go to the Linear rule, embeddings take
    RTN (a lookup table has no input Hessian), and the method rides inside the Recipe's rules."""
    if not embeddings:
        return scheme, targets, ignore, method, method_options
    rules = (Rule(tuple(targets or ("Linear",)), scheme, tuple(ignore), method,
                  options=tuple((method_options or {}).items())),
             Rule(("Embedding",), embeddings, tuple(ignore), "rtn"))
    return Recipe(rules, skip_output_head=targets is None), None, (), "rtn", None


def source_entries(scheme, recipe: Recipe, method: str, targets, ignore, sha256: str) -> dict:
    """The provenance entries saying what was asked for (scheme, the main method as
    `provenance.main_method` names it, float model's hash, targets and ignore as given), shared by
    `quantize` and `lowbit.streaming`."""
    source = {"scheme": scheme if isinstance(scheme, str) else recipe.to_json(),
              "method": method, "source_sha256": sha256}
    if isinstance(scheme, str):
        source.update(targets=[targets] if isinstance(targets, str) else
                      (None if targets is None else list(targets)),
                      ignore=[ignore] if isinstance(ignore, str) else list(ignore))
    return source


def quantize(model: torch.nn.Module, scheme: "str | QuantSpec | Scheme | Recipe" = "w4g128",
             targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn",
             data: Iterable | None = None, observer: str | None = None, allow_empty: bool = False,
             verbose: bool = True, progress: bool = False, sequential: bool = False,
             method_options: dict | None = None, smooth: float | None = None,
             group_fallback: bool = False) -> torch.nn.Module:
    """Quantize ``model`` in place and return it; prints what was quantized and skipped.

    ``data`` (an iterable of model inputs: tensors, tuples or dicts of tensors, or
    `lowbit.calibration.text_batches(...)`) is needed by methods that use calibration statistics
    (``method="gptq"``) and by static input quantization (``w8a8-static``); ``observer`` overrides
    the static input ranges' observer (minmax, ema, percentile, mse, histogram).
    ``sequential=True`` calibrates and quantizes block by block (`lowbit.sequential`);
    ``method_options`` sets the method's options (gptq: damp, act_order, block_size), recorded
    with the calibration data's hash in the file's provenance (`lowbit.provenance`).
    ``group_fallback=True`` gives a layer whose input width the scheme's group size does not
    divide the largest power-of-two group below it that does (SmolLM2's 576-wide layers take
    group 64 under ``w4g128``) instead of skipping it; the report names each such layer.
    ``smooth=alpha`` (in [0, 1], 0.5 in the paper) runs SmoothQuant (`lowbit.smooth.smooth`) on the
    planned layers before quantizing; int8-input layers whose producer cannot take the factors are
    smoothed at run time instead (`lowbit.smooth.smooth_at_runtime`, not with ``sequential``); it
    reads ``data`` more than once, so an iterator is read into a list first. Its report is ``model.lowbit_smooth``; if quantizing then fails, the model stays
    smoothed (the same float function).

    Raises `RecipeError` when a target matches no module, nothing would be quantized (unless
    ``allow_empty``) or calibration data is missing, and `QuantizationError` naming the layer when
    a weight cannot be quantized; either way the model is left as it was.
    """
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    from . import provenance, sequential as seq
    if isinstance(scheme, Recipe) and method != "rtn":
        raise RecipeError(f"method={method!r} given next to a Recipe: set each Rule's method inside "
                          "the Recipe (its rules decide, layer by layer)")
    recipe = with_observer(make_recipe(scheme, targets, ignore, method, method_options,
                                       group_fallback), observer)
    the_plan = plan_recipe(model, recipe, allow_empty=allow_empty)
    source = source_entries(scheme, recipe, provenance.main_method(the_plan, method), targets, ignore,
                            source_sha256(model))
    data = provenance.as_batches(data)  # read once: calibration, smoothing and the hash all use it
    runtime_smooth, stats = None, None
    if smooth is not None:
        data = materialize(data)
        runtime_smooth, stats = _smooth_first(model, data, smooth, the_plan, sequential, progress)
        source["smooth_alpha"] = smooth  # the float weights changed: the file must say so
    if sequential:
        report = seq.quantize_sequential(model, the_plan, data, calibration_needs(the_plan), progress)
    else:
        if stats is None:
            stats = calibrate_for(model, the_plan, data, progress, runtime_smooth)
        report = apply(model, the_plan, stats=stats, progress=progress, input_smooth=runtime_smooth)
    _speed_summary(model, report)
    model.lowbit_source = {**source, **provenance.method_provenance(the_plan, data, sequential)}
    model.lowbit_report = report
    if verbose:
        print(report, file=sys.stderr)
    if verbose and smooth is not None:
        print(model.lowbit_smooth, file=sys.stderr)
    return model


def _one_pass(the_plan: Plan, sequential: bool) -> bool:
    """Whether smoothing can share its calibration pass with the layers' own: every layer that
    needs statistics needs only a Hessian (GPTQ), none quantizes its inputs (those take run-time
    factors from a pass on the smoothed model), and not block by block."""
    needs = calibration_needs(the_plan)
    return (not sequential and bool(needs) and all(k == ("hessian",) for k in needs.values())
            and all(r.input_mode is None for r in the_plan.layers.values()))


def _smooth_first(model: torch.nn.Module, data: list, alpha: float, the_plan: Plan,
                  sequential: bool, progress: bool
                  ) -> tuple[dict[str, torch.Tensor] | None, dict[str, LayerStats] | None]:
    """SmoothQuant before quantizing (`model.lowbit_smooth` gets the report). Returns the run-time
    factors of int8-input layers whose producer cannot take them (None with ``sequential``:
    run-time smoothing is not wired into block-by-block quantization, so those layers stay
    unsmoothed, named in the report), and, when `_one_pass` holds, the layers' Hessians from
    smoothing's own calibration pass (else None: they are collected after)."""
    names = sorted(the_plan.layers)
    if _one_pass(the_plan, sequential):
        model.lowbit_smooth, stats = smooth_with_hessians(
            model, data, alpha, names, sorted(calibration_needs(the_plan)), progress)
        return None, stats
    model.lowbit_smooth = smooth_model(model, data, alpha=alpha, names=names)
    if sequential:
        return None, None
    int8_inputs = [n for n, r in the_plan.layers.items() if r.input_mode is not None]
    return smooth_at_runtime(model, data, model.lowbit_smooth, int8_inputs), None


def _speed_summary(model: torch.nn.Module, report) -> None:
    """The guardrail: each scheme's path and speed against float here, and a warning (also in the
    report) for each scheme whose layers run slower than float on this machine."""
    report.speed, slow = guardrail.summarize(guardrail.layer_speeds(model))
    report.warnings += slow
    for w in slow:
        warnings.warn(w, stacklevel=3)


def with_observer(recipe: Recipe, observer: str | None) -> Recipe:
    """``recipe`` with every static input spec's observer set to ``observer`` (None: unchanged)."""
    if observer is None:
        return recipe
    static = [r.input_spec is not None and r.input_spec.static for r in recipe.rules]
    rules = tuple(dataclasses.replace(r, input_spec=dataclasses.replace(r.input_spec, observer=observer))
                  if s else r for r, s in zip(recipe.rules, static))
    if not any(static):
        raise RecipeError(f"observer={observer!r} given but no rule quantizes inputs statically "
                          "(use a w8a8-static scheme)")
    return dataclasses.replace(recipe, rules=rules)


def calibration_needs(the_plan: Plan) -> dict[str, tuple[str, ...]]:
    """Planned layer -> the statistics its rule needs ("hessian" for data-driven methods,
    "range" for static inputs); layers that need none are left out."""
    needs = {}
    for name, rule in the_plan.layers.items():
        kinds = (("hessian",) if rule.method in NEEDS_DATA else ()) + \
                (("range",) if rule.input_mode == "static" else ())
        if kinds:
            needs[name] = kinds
    return needs


def calibrate_for(model: torch.nn.Module, the_plan: Plan, data: Iterable | None, progress: bool,
                  input_smooth: dict[str, torch.Tensor] | None = None) -> dict[str, LayerStats] | None:
    """Run calibration once for every layer that needs it (None when none does); layers smoothed
    at run time (``input_smooth``) are calibrated on their smoothed inputs."""
    needs = calibration_needs(the_plan)
    if not needs:
        return None
    if data is None:
        names = sorted(needs)
        raise RecipeError(f"calibration data needed (pass data=...): {len(names)} layer(s) use a "
                          f"method or static inputs that need it, e.g. {names[:3]}")
    kinds = tuple(sorted({k for ks in needs.values() for k in ks}))
    observers = {n: the_plan.layers[n].input_spec.observer for n, ks in needs.items() if "range" in ks}
    return collect(model, data, sorted(needs), stats=kinds, observer=observers or "minmax",
                   progress=progress, input_scale={n: s for n, s in (input_smooth or {}).items()
                                                   if n in needs})


def plan(model: torch.nn.Module, scheme: "str | QuantSpec | Scheme | Recipe" = "w4g128",
         targets: Sequence[str] | None = None, ignore: Sequence[str] = (), method: str = "rtn",
         allow_empty: bool = False) -> Plan:
    """What `quantize` with the same arguments would do, without touching the model."""
    return plan_recipe(model, make_recipe(scheme, targets, ignore, method), allow_empty=allow_empty)


__all__ = ["Plan", "Recipe", "Report", "Rule", "make_recipe", "plan", "quantize"]
