"""Forward of a product-quantized Linear: the `kernels.pq` forms side by side with fp32
`nn.Linear`, per shape and number of rows M, interleaved round by round (median and min).

    python benchmarks/pq_forward.py --threads 1
    python benchmarks/pq_forward.py --threads 2 --shape 384x384 --rows 64 --rounds 401 --budget 60

Weights are random (k-means is not run: the forms' speed depends only on shapes, k and block size).
``PQLinear`` is the layer as it runs: the form the kernel selector measured fastest here for that
shape class and row bucket (a fresh cache in a temporary folder; its choice is printed as
``auto``, its own timing as ``PQLinear``). ``cached`` keeps the decoded fp32 weight (no memory
saved); every other form keeps none. ``jit`` is the compiled lookup table (`kernels.pq_jit`;
its torch twin where numba is missing or ``LOWBIT_JIT=0``: the header says which).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile

import torch

from lowbit.eval.timing import interleaved
from lowbit.kernels import pq, pq_jit
from lowbit.kernels.select import KernelSelector
from lowbit.nn.pq import PQLinear
from lowbit.primitives.codebook import CodebookWeight, pack_assignments

SHAPES = ((384, 384), (1536, 384), (384, 1536), (4096, 4096))  # (out, in)
ROWS = (1, 8, 64)
K, BLOCK = 256, 8


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def random_codebook(out: int, inp: int, gen: torch.Generator) -> CodebookWeight:
    cent = (torch.randn(K, BLOCK, generator=gen) * 0.02).half()
    a = torch.randint(K, (out, inp // BLOCK), generator=gen)  # (out, n_blocks)
    return CodebookWeight(cent, pack_assignments(a, K), (out, inp), BLOCK)


FORMS = ("cached", "gather", "tiled", "lut", "lutg", "bf16", "bf16-jit", "jit", "PQLinear")


def bench(out: int, inp: int, rounds: int, cache_dir: str, rows: tuple[int, ...] = ROWS,
          budget_s: float = 6.0) -> None:
    gen = torch.Generator().manual_seed(0)
    cw = random_codebook(out, inp, gen)
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(pq.reconstruct(cw))
    bias = lin.bias.detach()
    cent, c16 = cw.centroids.float(), cw.centroids.to(torch.bfloat16)
    w, gidx, fa = pq.reconstruct(cw), pq.gather_index(cw), pq.flat_assign(cw)
    lidx, bags, gidx_t = pq.lut_index(cw), pq.lut_bags(cw), pq.lutg_index(cw)
    cent_t, codes_t = pq_jit.jit_centroids(cw), pq_jit.jit_codes(cw)  # jit: compiled if numba is here
    layer = PQLinear(cw, bias)  # no cache: the selector's measured form per row bucket
    layer.selector = KernelSelector(cache_dir)
    for m in rows:
        x = torch.randn(m, inp, generator=gen)
        with torch.inference_mode():
            auto = layer.form_for(m)  # times the forms once for this bucket (not in the rounds)
        fns = {"fp32": lambda: lin(x),
               "cached": lambda: pq.cached_linear(x, w, bias),
               "gather": lambda: pq.gather_linear(x, cent, gidx, bias),
               "tiled": lambda: pq.tiled_linear(x, cent, fa, out, bias),
               "lut": lambda: pq.lut_linear(x, cent, lidx, bags, bias),
               "lutg": lambda: pq.lutg_linear(x, cent, gidx_t, bias),
               "bf16": lambda: pq.bf16_linear(x, c16, fa, out, bias),
               "bf16-jit": lambda: pq.bf16_linear(x, c16, fa, out, bias, compiled=True),
               "jit": lambda: pq_jit.jit_linear(x, cent_t, codes_t, bias),
               "PQLinear": lambda: layer(x)}
        with torch.inference_mode():
            t = interleaved(fns, rounds=rounds, warmup=2, budget_s=budget_s)
        base = t["fp32"].median_ms
        cells = "".join(f"{t[n].median_ms / base:>9.2f}{t[n].min_ms / t['fp32'].min_ms:>7.2f}"
                        for n in FORMS)
        best = min(FORMS[:-1], key=lambda n: t[n].median_ms if n != "cached" else float("inf"))
        print(f"  {out:>5}x{inp:<5}{m:>4}{base:>9.3f}{t['fp32'].min_ms:>8.3f}{cells}   {best:<9}{auto}",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--shape", nargs="*", default=[f"{o}x{i}" for o, i in SHAPES],
                   help="out x in, e.g. 384x384 (default: all four)")
    p.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    p.add_argument("--budget", type=float, default=6.0, help="seconds per shape and M at most")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"k={K}, block {BLOCK}; ratios to fp32 nn.Linear (median ratio, min ratio); "
          f"jit: {'compiled' if pq_jit.available() else 'torch twin'}")
    print(f"  {'out x in':<11}{'M':>4}{'fp32 med':>9}{'min ms':>8}" +
          "".join(f"{n:>16}" for n in FORMS) + "   fastest*  auto")
    with tempfile.TemporaryDirectory(prefix="lowbit-pq-bench-") as cache_dir:
        for shape in args.shape:
            out, inp = (int(v) for v in shape.lower().split("x"))
            bench(out, inp, args.rounds, cache_dir, tuple(args.rows), args.budget)
    print("* fastest by median among the forms that keep no decoded weight (cached excluded)")


if __name__ == "__main__":
    main()
