"""`smooth`: SmoothQuant on a transformer model, in place, before int8 activation quantization
(Xiao et al., "SmoothQuant", ICML 2023, arXiv 2211.10438; the factors and folds are
`lowbit.algorithms.smooth`).

Steps: find producer -> consumers pairs on the first batch (`calibrate.pairs.find_pairs`; its
first `PROBE_TOKENS` positions for token batches, `probe_batch`), collect each pair's
per-input-channel range over every batch (`calibrate.collect`, a per-channel min-max observer),
compute ``s`` per pair, and fold it with `apply.scale_channels`. The float model's function is
checked on that same probe after folding: if any output moved by more than
`FOLD_RTOL` (relative to the output's largest magnitude), every fold is undone and `SmoothError`
names the worst output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch

from .algorithms.smooth import SmoothError, check_alpha, consumer_absmax, smoothing_factors
from .algorithms.stats import LayerStats
from .apply import ChannelScale, scale_channels
from .calibrate import ObserverConfig, call_model, collect
from .calibrate.collect import _eval_mode
from .calibrate.pairs import Pair, _tensors, find_pairs
from .textable import text_table

# Token positions of the first batch that the pair search and the fold check run on: both test
# the model's structure, not its statistics, and a whole window costs memory for nothing
# (SmolLM2, 512 tokens: the autograd trace held 0.8 GB, the check's logits 0.1 GB per copy).
PROBE_TOKENS = 64

# Largest change of any model output after folding, relative to that output's max |value|:
# float32 folds round each weight once (~6e-8 relative), which grows through a few layers.
FOLD_RTOL = 1e-4


@dataclass
class SmoothedPair:
    producer: str
    consumers: tuple[str, ...]
    how: str  # "traced" (tensor identity) or "fallback" (attention value -> output)
    factor_min: float
    factor_max: float


@dataclass
class SmoothReport:
    """What `smooth` did: the pairs folded (with the range of their factors), the named layers left
    unsmoothed (with reasons), alpha, and the largest relative output change measured."""
    alpha: float
    pairs: list[SmoothedPair] = field(default_factory=list)
    unsmoothed: dict[str, str] = field(default_factory=dict)
    max_rel_change: float = 0.0
    runtime: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> factors s (K,)

    @property
    def smoothed_layers(self) -> list[str]:
        return [c for p in self.pairs for c in p.consumers]

    def __str__(self) -> str:
        out = [f"lowbit smooth (alpha={self.alpha}): {len(self.pairs)} producer(s) folded into "
               f"{len(self.smoothed_layers)} layer(s), {len(self.unsmoothed)} named layer(s) left "
               f"unsmoothed; largest output change {self.max_rel_change:.1e} (relative)"]
        rows = [(p.producer, ", ".join(c.rsplit(".", 1)[-1] for c in p.consumers), p.how,
                 f"{p.factor_min:.3g}", f"{p.factor_max:.3g}") for p in self.pairs]
        if rows:
            out.append(text_table(("producer", "consumers", "found by", "s min", "s max"), rows,
                                  (False, False, False, True, True)))
        out += [f"  smoothed at run time (input / s inside the int8 layer) {n}: s in "
                f"[{float(f.min()):.3g}, {float(f.max()):.3g}]" for n, f in self.runtime.items()]
        out += [f"  unsmoothed {n}: {why}" for n, why in self.unsmoothed.items()]
        return "\n".join(out)


def probe_batch(batch: Any, tokens: int = PROBE_TOKENS) -> Any:
    """The first ``tokens`` positions of a token batch: a 2-D integer tensor ``(B, T)``, or a dict
    whose tensors are all ``(B, T)`` with the same shape and ``input_ids`` among them (what a
    tokenizer returns); any other batch, or a shorter one, as it is."""
    if isinstance(batch, torch.Tensor):
        cut = batch.dim() == 2 and not batch.is_floating_point() and batch.shape[1] > tokens
        return batch[:, :tokens] if cut else batch
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return batch
    shape = batch["input_ids"].shape
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if len(shape) != 2 or shape[1] <= tokens or any(t.shape != shape for t in tensors):
        return batch
    return {k: v[:, :tokens] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def materialize(data: Iterable) -> Sequence:
    """``data`` as a re-iterable sequence: lists and tuples as they are, any other iterable (a
    generator, an iterator) read once into a list."""
    if data is None:
        raise SmoothError("smoothing needs calibration data: pass data=... (an iterable of batches)")
    if isinstance(data, (list, tuple)):
        return data
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise SmoothError(f"data must be an iterable of batches, found a {type(data).__name__}")
    return list(data)


def smooth(model: torch.nn.Module, data: Iterable, alpha: float = 0.5,
           names: Sequence[str] | None = None) -> SmoothReport:
    """Smooth ``model`` in place for int8 activations and return what was done.

    ``data``: calibration batches (tensors, tuples or dicts of tensors); it is read more than once,
    so an iterator is first read into a list. ``names``: the Linears to smooth (default: all); each
    pair's other consumers are scaled too, so the float function stays the same. Layers whose
    producer cannot be found or folded exactly (e.g. a post-LN LayerNorm that also feeds the
    residual) are left unsmoothed and named in the report.
    """
    return _smooth(model, data, alpha, names, (), False)[0]


def smooth_with_hessians(model: torch.nn.Module, data: Iterable, alpha: float,
                         names: Sequence[str] | None, layers: Sequence[str],
                         progress: bool = False) -> tuple[SmoothReport, dict[str, LayerStats]]:
    """`smooth`, and the input Hessians of ``layers`` *of the smoothed model*, from one
    calibration pass instead of two (`lowbit.quantize(smooth=..., method="gptq")`; on SmolLM2 one
    pass of 128 x 512 tokens is 3.3 min on 2 cores). The pass collects the pairs' channel ranges
    and every Hessian on the float model; the fold then divides each smoothed consumer's input
    channel ``j`` by ``s_j``, so its Hessian becomes exactly ``H_ij / (s_i s_j)`` (the fold keeps
    every other layer's input as it was). Equal to smoothing first and calibrating after up to
    float rounding (tested)."""
    return _smooth(model, data, alpha, names, tuple(layers), progress)


def _smooth(model: torch.nn.Module, data: Iterable, alpha: float, names: Sequence[str] | None,
            hessian_layers: tuple[str, ...], progress: bool
            ) -> tuple[SmoothReport, dict[str, LayerStats]]:
    alpha = check_alpha(alpha)
    batches = materialize(data)
    if not batches:
        raise SmoothError("smooth needs at least one calibration batch; data is empty")
    probe = probe_batch(batches[0])
    search = find_pairs(model, probe, names)
    report = SmoothReport(alpha, unsmoothed=dict(search.unpaired))
    firsts = [p.consumers[0] for p in search.pairs]
    wanted = list(dict.fromkeys(firsts + list(hessian_layers)))
    if not wanted:
        return report, {}
    observer = ObserverConfig(name="minmax", per_channel=True)
    stats = collect(model, batches, wanted, stats=("range", "hessian") if hessian_layers else ("range",),
                    observer=observer, progress=progress)
    hessians = {n: stats[n] for n in hessian_layers}
    if not search.pairs:
        return report, hessians
    scales = _factors(model, stats, search.pairs, alpha)
    before = _outputs(model, probe)

    def check() -> None:
        report.max_rel_change = _max_rel_change(before, _outputs(model, probe, keep=False))

    scale_channels(model, scales, check)
    report.pairs = [SmoothedPair(p.producer, p.consumers, p.how, float(sc.factors.min()),
                                 float(sc.factors.max())) for p, sc in zip(search.pairs, scales)]
    _scale_hessians(hessians, scales)
    return report, hessians


def _scale_hessians(hessians: dict[str, LayerStats], scales: list[ChannelScale]) -> None:
    """Each smoothed consumer's Hessian made that of its new inputs ``x_j / s_j``:
    ``H_ij / (s_i s_j)``. Layers fed one tensor share one Hessian object (`calibrate.collect`);
    it is scaled once, in place, when every layer holding it is a consumer of the same factors
    (q/k/v of one norm), else the consumer gets a scaled copy."""
    holders: dict[int, set[str]] = {}
    for n, st in hessians.items():
        holders.setdefault(id(st.hessian), set()).add(n)
    done: set[int] = set()
    for sc in scales:
        inv = sc.factors.double().reciprocal()
        for c in sc.consumers:
            if c not in hessians:
                continue
            h = hessians[c].hessian
            scaled = lambda: (h.double() * inv.unsqueeze(1) * inv.unsqueeze(0)).to(h.dtype)  # noqa: E731
            if holders[id(h)] <= set(sc.consumers):
                if id(h) not in done:
                    h.copy_(scaled())
                    done.add(id(h))
            else:
                holders[id(h)].discard(c)
                hessians[c] = replace(hessians[c], hessian=scaled())
                holders[id(hessians[c].hessian)] = {c}


def smooth_at_runtime(model: torch.nn.Module, data: Sequence, report: SmoothReport,
                      names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Factors for the Linears in ``names`` that `smooth` left unsmoothed (their producer cannot
    take them exactly, e.g. a post-LN LayerNorm that also feeds the residual): the same
    ``s = max|x_j| ** alpha / max|W_j| ** (1 - alpha)`` from the layer's own input, applied inside
    the quantized layer at run time (`nn.QLinearA8`; static inputs are then calibrated on
    ``x / s``, `calibrate.collect(input_scale=...)`). Moves them from
    ``report.unsmoothed`` to ``report.runtime`` and returns ``{layer: s (in_features,) float32}``."""
    wanted = [n for n in names if n in report.unsmoothed
              and isinstance(model.get_submodule(n), torch.nn.Linear)]
    if not wanted:
        return {}
    observer = ObserverConfig(name="minmax", per_channel=True)
    stats = collect(model, data, wanted, stats=("range",), observer=observer, progress=False)
    for name in wanted:
        lo, hi = stats[name].input_range  # (K,), (K,)
        w = model.get_submodule(name).weight
        s = smoothing_factors(torch.maximum(lo.abs(), hi.abs()), consumer_absmax([w], name),
                              report.alpha, name)
        report.runtime[name] = s.float()
        del report.unsmoothed[name]
    return dict(report.runtime)


def _factors(model: torch.nn.Module, stats: dict[str, LayerStats], pairs: list[Pair],
             alpha: float) -> list[ChannelScale]:
    """Each pair's factors from its first consumer's per-channel input range (``stats``)."""
    scales = []
    for p in pairs:
        lo, hi = stats[p.consumers[0]].input_range  # (C,), (C,)
        act = torch.maximum(lo.abs(), hi.abs())
        weights = [model.get_submodule(c).weight for c in p.consumers]
        s = smoothing_factors(act, consumer_absmax(weights, p.producer), alpha, p.producer)
        scales.append(ChannelScale(p.producer, p.consumers, s))
    return scales


def _outputs(model: torch.nn.Module, batch: Any, keep: bool = True) -> list[torch.Tensor]:
    """The model's floating outputs on ``batch``; ``keep``: copied, so that a later change of the
    parameters cannot reach them (an output may alias one). The outputs after the fold are
    compared at once and not copied (SmolLM2's logits of one 512-token window are 100 MB)."""
    with _eval_mode(model), torch.inference_mode():
        out = [t for t in _tensors(call_model(model, batch)) if t.is_floating_point()]
        return [t.float().clone() if keep else t.float() for t in out]


def _max_rel_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    worst, where = 0.0, None
    for i, (a, b) in enumerate(zip(before, after)):
        rel = float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
        if not rel <= worst:  # also catches NaN
            worst, where = rel, i
    if not worst <= FOLD_RTOL:
        raise SmoothError(f"smoothing changed model output {where} by {worst:.2e} relative "
                          f"(allowed {FOLD_RTOL:.0e}); every fold was undone")
    return worst
