"""Streaming from shards vs loading the model: SmolLM2-135M-Instruct quantized by ``lowbit
quantize``'s two paths, each in a fresh process: peak RSS and time.

    PYTHONPATH=src python benchmarks/stream_smollm2.py [--threads 1] [--rounds 3] [--scheme w4g64]
        [--method rtn|gptq --samples 16 --seq-len 256]

The model ships as a Q4_1 GGUF (see ../shared/REALDATA.md): it is converted once, in a temporary
folder, to a transformers folder of fp32 safetensors shards (100 MB each) plus its tokenizer.
Then, round by round (`lowbit.eval.timing.interleaved`), one fresh process per path: ``loaded`` = `models.load_transformers` + `lowbit.quantize` (GPTQ: ``sequential=True``) +
`lowbit.save`; ``stream`` = `lowbit.quantize_checkpoint`. Each child reports the seconds of that
work and its peak RSS (VmHWM) minus its RSS after the imports; the parent checks that both
artifacts are byte-identical. w4g64 quantizes all 210 block Linears (SmolLM2's 576-wide inputs
are not a multiple of 128); the tied output head stays float, as by default.
GPTQ calibration: random ``--seq-len`` windows of other Shakespeare plays (as gptq_smollm2.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gptq_smollm2 import calibration, cpu_name, load_smollm2  # noqa: E402

SHARD_BYTES = 100 * 2**20


def convert(folder: Path) -> float:
    """The GGUF model as fp32 safetensors shards + tokenizer in ``folder``; returns its MB."""
    from safetensors.torch import save_file
    model, tok = load_smollm2()  # a GGUF-loaded model refuses save_pretrained: write the shards here
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # the GGUF config names none: keep the LM head
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = {k: t.contiguous() for k, t in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    shards, size = [{}], 0
    for k, t in state.items():
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.nbytes
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One path in this (fresh) process; prints a JSON line."""
    import transformers
    import lowbit
    from lowbit.models import load_transformers, side_files
    torch.set_num_threads(args.threads)
    transformers.LlamaForCausalLM  # resolve the lazy import before measuring
    src = Path(args.src)
    data = None
    if args.method == "gptq":
        data = calibration(transformers.AutoTokenizer.from_pretrained(str(src)), args.samples, args.seq_len)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    if args.child == "stream":
        lowbit.quantize_checkpoint(src, args.scheme, args.out, method=args.method, data=data,
                                   side_files=side_files(src), progress=False, verbose=False)
    else:
        model, _ = load_transformers(src)
        lowbit.quantize(model, args.scheme, method=args.method, data=data,
                        sequential=args.method == "gptq", verbose=False)
        lowbit.save(model, args.out, side_files=side_files(src))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": status_mb("VmHWM") - before}))


def run(args, mode: str, src: Path, out: Path, log: dict) -> None:
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out / mode),
           "--threads", str(args.threads), "--scheme", args.scheme, "--method", args.method,
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    log[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--child", default=None, choices=("stream", "loaded"))
    ap.add_argument("--src", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from lowbit.eval.timing import interleaved
    with tempfile.TemporaryDirectory(prefix="stream-smollm2-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        mb = convert(src)
        cal = f", {args.samples} x {args.seq_len} calibration tokens" if args.method == "gptq" else ""
        print(f"# SmolLM2-135M-Instruct as {mb:.0f} MiB of fp32 safetensors shards; {cpu_name()}; "
              f"torch {torch.__version__}; {args.threads} thread(s); {args.scheme} {args.method}{cal}; "
              f"machine shared with other engineers (loaded)")
        log: dict[str, list] = {"loaded": [], "stream": []}
        interleaved({m: (lambda m=m: run(args, m, src, out, log)) for m in log}, rounds=args.rounds, warmup=0)
        same = (out / "loaded/model.safetensors").read_bytes() == (out / "stream/model.safetensors").read_bytes()
        report(log, mb, same)


def report(log: dict, mb: float, same: bool) -> None:
    print(f"{'path':<8}{'rounds':>7}{'s median':>10}{'s min':>8}{'peak MiB median':>17}{'min':>7}")
    med = {}
    for mode, rows in log.items():
        s, p = [r["seconds"] for r in rows], [r["peak_mb"] for r in rows]
        med[mode] = (statistics.median(s), statistics.median(p))
        print(f"{mode:<8}{len(rows):>7}{med[mode][0]:>10.1f}{min(s):>8.1f}{med[mode][1]:>17.0f}{min(p):>7.0f}")
    print(f"stream / loaded: time {med['stream'][0] / med['loaded'][0]:.2f}x, peak memory "
          f"{med['stream'][1] / med['loaded'][1]:.2f}x; fp32 model {mb:.0f} MiB; artifacts byte-identical: {same}")


if __name__ == "__main__":
    main()
