"""Which compute path is fastest for a weight-only QLinear, per shape and number of rows M: the
measurements behind `kernels.cpu.INT4_MAX_ROWS` / `INT8_MAX_ROWS`. Each lowbit path is pinned with
`QLinear.set_path` and timed side by side with fp32 (`F.linear`) and a bf16 GEMM on a
pre-dequantized weight (slow on the Intel Xeon these crossovers were measured on, fast on an AMD
EPYC: see `kernels.bf16`, `kernels.select` and benchmarks/activations.py). Prints the ratio of
each path's median to fp32's median, interleaved round by round.

    python benchmarks/kernel_paths.py --threads 1
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lowbit.eval.timing import interleaved
from lowbit.nn import QLinear
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

SHAPES = ((4096, 4096), (1024, 4096), (384, 1536), (1536, 384), (384, 384))  # (K, N)
ROWS = (1, 8, 16, 32, 64, 128, 256, 512, 1024)


def qlinear(w: torch.Tensor, scheme: str, path: str) -> QLinear:
    layer = QLinear(quantize_weight(w, parse_scheme(scheme)), None)
    layer.set_path(path)
    return layer


def bench_shape(k: int, n: int, rows: tuple[int, ...], rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    layers = {"w4 int4mm": qlinear(w, "w4g128", "int4mm"), "w4 f32": qlinear(w, "w4g128", "f32"),
              "w8 int8mm": qlinear(w, "w8", "int8mm"), "w8 f32": qlinear(w, "w8", "f32")}
    wb = w.bfloat16()
    print(f"\nK={k} N={n}: ratio of median to fp32's median (fp32 median in ms)")
    print(f"  {'M':>5}{'fp32 ms':>9}" + "".join(f"{name:>11}" for name in layers) + f"{'bf16 GEMM':>11}")
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        fns = {"fp32": lambda: F.linear(x, w)}
        fns.update({name: (lambda lay=lay: lay(x)) for name, lay in layers.items()})
        fns["bf16 GEMM"] = lambda: F.linear(x.bfloat16(), wb)
        t = interleaved(fns, rounds=rounds, budget_s=4.0)
        base = t["fp32"].median_ms
        print(f"  {m:>5}{base:>9.3f}" + "".join(f"{t[name].median_ms / base:>11.2f}" for name in fns if name != "fp32"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for k, n in SHAPES:
        bench_shape(k, n, ROWS if k * n < 4096 * 4096 else ROWS[:-2], args.rounds)


if __name__ == "__main__":
    main()
