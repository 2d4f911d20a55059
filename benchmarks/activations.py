"""Layer kernels and MiniLM end to end: fp32 vs torch.ao dynamic int8 vs lowbit's kernel paths.

Layer table: each path on the same weight, side by side, interleaved round by round (fp32's
median and min ms and each path's ratio to them): torch.ao ``quantize_dynamic`` Linear (the
peer), lowbit ``w8a8`` (per-token dynamic), ``w8a8-static`` (one activation range), weight-only
``w8`` int8mm, ``w4g128`` int4mm, and dequantize-per-call to bf16 / fp32. ``choice`` is what
`kernels.select.KernelSelector` picks on this host among the w8 paths (w8a8, int8mm, bf16, f32).

End to end: all-MiniLM-L6-v2 with its Linear layers' forward replaced *in this script only*
(nn/ is not touched) by lowbit kernels, plus fp32, torch.ao and the modules `lowbit.quantize`
makes (``QLinearA8`` for ``w8a8``: the kernel plus the module's own per-call work and the
selector's path per row count; ``QLinear`` for the weight-only schemes); mean / min cosine of sentence embeddings vs fp32 over `eval.sentences.SENTENCES`.

    python benchmarks/activations.py --threads 1 [--skip-layers] [--skip-model]
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import torch.nn.functional as F

from lowbit.eval.timing import interleaved
from lowbit.kernels import bf16, cpu, int8_dynamic as k8
from lowbit.kernels.select import KernelSelector, describe_host, shape_class
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

SHAPES = ((384, 384), (384, 1536), (1536, 384), (4096, 4096))  # (K, N)
ROWS = (1, 64, 2048)
# weight-only packed kernels at 2,048 rows on 4096 x 4096 take seconds a call: not timed there
SLOW_SKIP = {("w8 int8mm", 4096, 2048), ("w4 int4mm", 4096, 2048)}
W8_PATHS = {"w8a8": "w8a8", "int8mm": "w8 int8mm", "bf16": "w8 bf16", "f32": "w8 f32"}  # selector: table


def ao_linear(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Module:
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                  dtype=torch.qint8)


def layer_paths(w: torch.Tensor, b: torch.Tensor, x_calib: torch.Tensor) -> dict:
    """name -> callable(x2d) for every path on weight ``w`` (N, K)."""
    w8, w4 = quantize_weight(w, parse_scheme("w8")), quantize_weight(w, parse_scheme("w4g128"))
    p8 = k8.prepare_w8a8(w8.qdata, w8.scale)
    lo, hi = x_calib.min().item(), x_calib.max().item()
    s_x, z_x = (hi - lo) / 255, -lo / ((hi - lo) / 255)
    i8, i4 = cpu.prepare_int8(w8), cpu.prepare_int4(w4)
    f8, f4 = cpu.f32_params(w8), cpu.f32_params(w4)
    ao = ao_linear(w, b)
    return {"torch.ao": ao, "w8a8": lambda x: k8.w8a8_linear(x, p8, b),
            "w8a8-st": lambda x: k8.w8a8_static_linear(x, p8, s_x, z_x, b),
            "w8 int8mm": lambda x: cpu.int8_linear(x, *i8).float().add_(b),
            "w4 int4mm": lambda x: cpu.int4_linear(x, i4[0], 128, i4[1]).float().add_(b),
            "w8 bf16": lambda x: bf16.bf16_linear(x, w8, *f8, b),
            "w4 bf16": lambda x: bf16.bf16_linear(x, w4, *f4, b),
            "w8 f32": lambda x: cpu.f32_linear(x, w8, *f8, b),
            "w4 f32": lambda x: cpu.f32_linear(x, w4, *f4, b)}


def w8_choice(selector: KernelSelector, paths: dict, k: int, n: int, m: int) -> str:
    cands = {name: paths[column] for name, column in W8_PATHS.items()}
    return selector.choose(shape_class("w8", 8, None, n, k), m, runners(cands, k))


def runners(fns: dict, k: int) -> dict:
    """Selector candidates: each runs its path on M rows of one shared input made once per M."""
    inputs: dict[int, torch.Tensor] = {}

    def run(f, m: int):
        if m not in inputs:
            inputs[m] = torch.randn(m, k)
        return f(inputs[m])
    return {name: (lambda m, f=f: run(f, m)) for name, f in fns.items()}


def bench_layers(rounds: int, selector: KernelSelector) -> None:
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w, b = torch.randn(n, k, generator=gen) * 0.05, torch.randn(n, generator=gen) * 0.1
        paths = layer_paths(w, b, torch.randn(256, k, generator=gen))
        names = list(paths)
        print(f"\nLinear K={k} N={n}: fp32 ms, then each path's time / fp32's; per M a median row "
              "and a (min) row")
        print(f"  {'M':>5}{'fp32 ms':>9}" + "".join(f"{name:>11}" for name in names) + f"{'choice':>11}")
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            fns = {"fp32": lambda: F.linear(x, w, b)}
            fns.update({nm: (lambda f=f: f(x)) for nm, f in paths.items() if (nm, k, m) not in SLOW_SKIP})
            t = interleaved(fns, rounds=rounds if m * k * n < 2 ** 31 else 3, budget_s=6.0)
            for stat in ("median_ms", "min_ms"):
                base = getattr(t["fp32"], stat)
                cells = "".join(f"{getattr(t[nm], stat) / base:>11.2f}" if nm in t else f"{'-':>11}"
                                for nm in names)
                tail = w8_choice(selector, paths, k, n, m) if stat == "median_ms" else "(min)"
                print(f"  {m if stat == 'median_ms' else '':>5}{base:>9.3f}{cells}{tail:>11}", flush=True)


def patch_linears(model: torch.nn.Module, make) -> torch.nn.Module:
    """Replace each Linear's forward of ``model`` (a copy) by ``make(module)``, a 2-D callable."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            fn = make(mod)
            mod.forward = lambda x, fn=fn: fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return model


def input_ranges(model: torch.nn.Module, run) -> dict:
    """min / max of each Linear's input while ``run()`` runs (hooks removed even on error)."""
    ranges, handles = {}, []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args):
                lo, hi = args[0].min().item(), args[0].max().item()
                old = ranges.get(m, (lo, hi))
                ranges[m] = (min(lo, old[0]), max(hi, old[1]))
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return ranges


def w8a8_maker(static_ranges: dict | None = None, selector: KernelSelector | None = None):
    def make(mod):
        qw = quantize_weight(mod.weight, parse_scheme("w8"))
        p8, b = k8.prepare_w8a8(qw.qdata, qw.scale), mod.bias
        if static_ranges is not None:
            lo, hi = static_ranges[mod]
            s = (hi - lo) / 255
            return lambda x: k8.w8a8_static_linear(x, p8, s, -lo / s, b)
        if selector is None:
            return lambda x: k8.w8a8_linear(x, p8, b)
        return auto_w8(mod, qw, p8, selector)
    return make


def auto_w8(mod, qw, p8, selector: KernelSelector):
    """w8 weights; per call the selector's path for the number of rows among w8a8 / int8mm /
    bf16 / f32 (the same candidates as the layer table's ``choice``)."""
    b, i8, f8 = mod.bias, cpu.prepare_int8(qw), cpu.f32_params(qw)
    fns = {"w8a8": lambda x: k8.w8a8_linear(x, p8, b),
           "int8mm": lambda x: cpu.int8_linear(x, *i8).float().add_(b),
           "bf16": lambda x: bf16.bf16_linear(x, qw, *f8, b),
           "f32": lambda x: cpu.f32_linear(x, qw, *f8, b)}
    runs = runners(fns, qw.shape[1])
    key = shape_class("w8", 8, None, *qw.shape)
    return lambda x: fns[selector.choose(key, x.shape[0], runs)](x)


def bf16_maker(scheme: str):
    def make(mod):
        qw = quantize_weight(mod.weight, parse_scheme(scheme))
        params, b = cpu.f32_params(qw), mod.bias
        return lambda x: bf16.bf16_linear(x, qw, *params, b)
    return make


def minilm_variants(model, tok, selector: KernelSelector) -> dict:
    from lowbit import api
    from lowbit.eval.sentences import SENTENCES
    from lowbit.eval.embeddings import sentence_embeddings
    ranges = input_ranges(model, lambda: sentence_embeddings(model, tok, list(SENTENCES)))
    by_name = {name: ranges[mod] for name, mod in model.named_modules() if mod in ranges}

    def static_copy():
        c = copy.deepcopy(model)
        rng = {mod: by_name[name] for name, mod in c.named_modules() if name in by_name}
        return patch_linears(c, w8a8_maker(static_ranges=rng))
    return {"fp32": model,
            "torch.ao dyn int8": torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8),
            "w8a8": patch_linears(copy.deepcopy(model), w8a8_maker()),
            "w8a8-static minmax": static_copy(),
            "w8 auto (select)": patch_linears(copy.deepcopy(model), w8a8_maker(selector=selector)),
            "w8 bf16": patch_linears(copy.deepcopy(model), bf16_maker("w8")),
            "w4g128 bf16": patch_linears(copy.deepcopy(model), bf16_maker("w4g128")),
            "w8a8 QLinearA8": api.quantize(copy.deepcopy(model), "w8a8", verbose=False),
            "w8 QLinear": api.quantize(copy.deepcopy(model), "w8", verbose=False),
            "w4g128 QLinear": api.quantize(copy.deepcopy(model), "w4g128", verbose=False)}


def bench_minilm(rounds: int, selector: KernelSelector) -> None:
    import time
    from lowbit.eval.embeddings import sentence_embeddings
    from lowbit.eval.sentences import SENTENCES
    from lowbit.models import DEFAULT_MODEL, load_transformers, resolve_model_dir
    model, tok = load_transformers(resolve_model_dir(DEFAULT_MODEL))
    variants = minilm_variants(model, tok, selector)
    ref = sentence_embeddings(model, tok, list(SENTENCES))
    t0 = time.perf_counter()
    quality = {k: (sentence_embeddings(m, tok, list(SENTENCES)) * ref).sum(-1) for k, m in variants.items()}
    print(f"\nall-MiniLM-L6-v2 ({len(SENTENCES)} sentences; quality pass incl. the selector's "
          f"cold-cache timing took {time.perf_counter() - t0:.1f} s)")
    b64 = tok(list(SENTENCES[:64]), padding=True, return_tensors="pt")
    b1 = tok(list(SENTENCES[:1]), return_tensors="pt")
    t64 = interleaved({k: (lambda m=m: m(**b64)) for k, m in variants.items()}, rounds=rounds)
    t1 = interleaved({k: (lambda m=m: m(**b1)) for k, m in variants.items()}, rounds=rounds * 4)
    print(f"  batch 64 = {b64['input_ids'].numel()} tokens, batch 1 = {b1['input_ids'].numel()} tokens")
    print(f"  {'method':<20}{'b64 ms':>9}{'x fp32':>8}{'min x':>7}{'b1 ms':>8}{'x fp32':>8}{'min x':>7}"
          f"{'cos mean':>10}{'cos min':>9}")
    for k in variants:
        print(f"  {k:<20}{t64[k].median_ms:>9.2f}{t64[k].median_ms / t64['fp32'].median_ms:>8.2f}"
              f"{t64[k].min_ms / t64['fp32'].min_ms:>7.2f}"
              f"{t1[k].median_ms:>8.2f}{t1[k].median_ms / t1['fp32'].median_ms:>8.2f}"
              f"{t1[k].min_ms / t1['fp32'].min_ms:>7.2f}"
              f"{quality[k].mean().item():>10.5f}{quality[k].min().item():>9.5f}")
    for row in selector.cached_choices():
        print(f"  selector: {row['shape']:<24} rows {row['bucket']:<8} -> {row['path']:<7} "
              + " ".join(f"{n} {v:.3f}" for n, v in row["ms"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    host = describe_host()
    print(f"CPU: {host['cpu']} ({host['capability']}; flags {', '.join(host['flags'])}), "
          f"torch {host['torch']}, {host['threads']} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        selector = KernelSelector(tmp)
        if not args.skip_layers:
            bench_layers(args.rounds, selector)
        if not args.skip_model:
            bench_minilm(args.rounds, selector)


if __name__ == "__main__":
    main()
