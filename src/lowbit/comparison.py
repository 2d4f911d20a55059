"""`lowbit.compare`: quantize one model under several schemes (and methods) and measure each as a
user would ship it: saved with `lowbit.save`, loaded back with `lowbit.load`, then

- bytes on disk: the saved weights file (fp32 too is saved through `lowbit.save`);
- resident memory: a fresh Python process loads the saved folder and reports its RSS growth and
  peak (VmHWM) over the baseline with torch, transformers and lowbit imported (`rss_probe`; the
  probes run beside the next rows' work, and are all done before any timing starts);
- latency at batch 1 and a larger batch: every loaded model, fp32 included, timed in this process
  with `eval.timing.interleaved` (the timing code of `benchmarks/`), round by round;
- quality on a `lowbit.tasks` task and its delta vs fp32.

A scheme slower than fp32 here (median above `SLOWER_THAN_FP32` times fp32's at some batch) is
flagged, with the reason from `guardrail` (each layer's measured kernel path vs the float layer).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from . import api, guardrail, io
from .compare_report import CompareReport, CompareRow, Latency
from .eval.sentences import SENTENCES
from .eval.timing import cpu_name, interleaved
from .recipe import Recipe, Rule
from .tasks import Task, drop, resolve_task

DEFAULT_SCHEMES = ("fp32", "w8", "w8a8", "w4g128", "w4g32")
SLOWER_THAN_FP32 = 1.05   # median latency above this multiple of fp32's at some batch is flagged
B1_ROUNDS_FACTOR = 6      # batch 1 is quick and noisy: it gets this many times the rounds


def scheme_recipe(label: str) -> "str | Recipe":
    """A scheme label -> what `quantize` takes; ``+emb8`` adds row-wise 8-bit embeddings."""
    if label.endswith("+emb8"):
        base = label.removesuffix("+emb8")
        return Recipe((Rule(("Linear",), base), Rule(("Embedding",), "w8r")))
    return label


def rss_probe(path: str | Path, threads: int = 1, timeout_s: float = 300) -> tuple[float, float]:
    """(RSS growth, peak RSS over the baseline) in MB while a FRESH process runs `lowbit.load` on
    ``path``. The baseline is taken after torch, transformers (the saved class) and lowbit are
    imported, so the figures are the model's, not the libraries'."""
    return finish_probe(start_probe(path, threads), timeout_s)


def start_probe(path: str | Path, threads: int = 1) -> tuple[subprocess.Popen, str]:
    """Start `rss_probe`'s fresh process and return at once (it runs beside the caller's work)."""
    src = str(Path(__file__).resolve().parents[1])  # the folder that holds this lowbit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(path), str(threads)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, str(path)


def finish_probe(probe: tuple[subprocess.Popen, str], timeout_s: float = 300) -> tuple[float, float]:
    proc, path = probe
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"memory probe of {path}: no answer in {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed: {err.strip()[-500:]}")
    d = json.loads(out.strip().splitlines()[-1])
    return d["rss_mb"], d["peak_mb"]


_PROBE = """
import gc, json, sys
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) / 1024
    return d
import torch
torch.set_num_threads(int(sys.argv[2]))
import lowbit
cls = lowbit.io.read_header(sys.argv[1]).get("model", {}).get("transformers_class")
if cls:
    import transformers
    getattr(transformers, cls)
gc.collect()
before = status()
model = lowbit.load(sys.argv[1])
gc.collect()
after = status()
print(json.dumps({"rss_mb": after["VmRSS"] - before["VmRSS"], "peak_mb": after["VmHWM"] - before["VmRSS"]}))
"""


def batch_inputs(tokenizer, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` of the demo sentences (cycled), tokenized and padded; a tokenizer without a pad
    token (most causal LMs) gets the first sentence ``batch`` times (no padding needed)."""
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    if getattr(tokenizer, "pad_token", None) is None:
        texts = [texts[0]] * batch
        return tokenizer(texts, return_tensors="pt")
    return tokenizer(texts, padding=True, return_tensors="pt")


def _call(model: torch.nn.Module, x: Any):
    return model(**x) if isinstance(x, dict) or hasattr(x, "keys") else \
        model(*x) if isinstance(x, tuple) else model(x)


def time_models(models: dict[str, torch.nn.Module], inputs: dict[int, Any], rounds: int,
                budget_s: float | None = None) -> dict[str, tuple[Latency, ...]]:
    """Every model at every batch, interleaved round by round (batch 1 gets more rounds)."""
    out: dict[str, list[Latency]] = {k: [] for k in models}
    for b, x in inputs.items():
        fns = {k: (lambda m=m: _call(m, x)) for k, m in models.items()}
        n = rounds * B1_ROUNDS_FACTOR if b == 1 else rounds
        for k, t in interleaved(fns, rounds=n, budget_s=budget_s).items():
            out[k].append(Latency(b, t.median_ms, t.min_ms, t.rounds))
    return {k: tuple(v) for k, v in out.items()}


def slow_flags(latency: Sequence[Latency], fp32: Sequence[Latency],
               speeds: list[guardrail.LayerSpeed]) -> tuple[str, ...]:
    """One line per batch where this row's median is above `SLOWER_THAN_FP32` x fp32's, with the
    reason read from the kernel measurements (`guardrail.layer_speeds`): layers with no fast kernel
    (dequantized on every call), layers whose path is slower than the float layer, or neither
    (the extra time is outside the quantized Linears, or noise)."""
    base = {t.batch: t.median_ms for t in fp32}
    lines = []
    for t in latency:
        if base.get(t.batch) and t.median_ms > SLOWER_THAN_FP32 * base[t.batch]:
            rows = guardrail.ROWS[0] if t.batch == 1 else guardrail.ROWS[-1]
            lines.append(f"slower than fp32 at batch {t.batch} ({t.median_ms / base[t.batch]:.2f}x): "
                         f"{slow_reason(speeds, rows)}")
    return tuple(lines)


def slow_reason(speeds: list[guardrail.LayerSpeed], rows: int) -> str:
    """Why quantized layers cost time at ``rows`` input rows, in one short sentence."""
    ref = [s for s in speeds if any(p == "ref" for r, p, _, _ in s.paths if r == rows)]
    if ref:
        schemes = sorted({s.scheme for s in ref})
        return (f"{', '.join(schemes)}: no fast kernel on this CPU, {len(ref)} of {len(speeds)} "
                "layers dequantize their weight on every call")
    slow = [(s.name, p, x) for s in speeds for r, p, x, extra in s.paths
            if r == rows and x is not None and x > guardrail.SLOWER and extra > guardrail.SLOWER_MS]
    if slow:
        paths = sorted({p for _, p, _ in slow})
        return (f"{len(slow)} of {len(speeds)} layers take path {'/'.join(paths)} at {rows} row(s), up to "
                f"{max(x for *_, x in slow):.2f}x the float layer's time (no faster quantized path here)")
    return ("no quantized layer is slower than float in the kernel measurements: the extra time is "
            "outside the quantized Linears (input quantization, embeddings, attention) or noise")


def _load_source(model_or_path, tokenizer):
    """(model, tokenizer, model_dir or None, display name)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path.eval(), tokenizer, None, type(model_or_path).__name__
    from .models import load_transformers, resolve_model_dir
    model_dir = resolve_model_dir(str(model_or_path))
    model, tok = load_transformers(model_dir)
    return model, tokenizer or tok, model_dir, str(model_or_path)


def _rows_to_run(schemes: Sequence[str], method: "str | Sequence[str]") -> list[tuple[str, str, str]]:
    """(label, scheme, method) per row, fp32 first; a method other than rtn is named in the label."""
    methods = (method,) if isinstance(method, str) else tuple(method)
    rows = [("fp32", "fp32", "-")]
    for s in schemes:
        if s == "fp32":
            continue
        for m in methods:
            rows.append((s if m == "rtn" else f"{s} {m}", s, m))
    return rows


def _quantize_saved(model, scheme: str, method: str, data, folder: Path, side: dict):
    """The model under ``scheme`` saved to ``folder`` and loaded back: (loaded, weights file)."""
    with warnings.catch_warnings():  # a slow path is reported as the row's flag instead
        warnings.simplefilter("ignore", UserWarning)
        q = model if scheme == "fp32" else api.quantize(copy.deepcopy(model), scheme_recipe(scheme),
                                                        method=method, data=data, verbose=False)
    path = io.save(q, folder, side_files=side)
    if q is not model:
        del q
    return io.load(folder, model=None if hasattr(model, "config") else copy.deepcopy(model)), path


def compare(model_or_path: "str | Path | torch.nn.Module", schemes: Sequence[str] = DEFAULT_SCHEMES,
            method: "str | Sequence[str]" = "rtn", task: "str | Task" = "embeddings",
            data: Iterable | None = None, batch: Sequence[int] = (1, 64), rounds: int = 5,
            threads: int | None = None, tokenizer=None, task_options: dict | None = None,
            inputs: Callable[[int], Any] | None = None, memory: bool = True,
            workdir: str | Path | None = None, progress: bool = True) -> CompareReport:
    """Measure ``schemes`` (labels of `lowbit.parse_scheme`, plus ``+emb8`` for 8-bit embeddings)
    under each ``method`` against fp32 and return a `CompareReport`.

    ``model_or_path``: a transformers folder or installed model package (its tokenizer is used),
    or an nn.Module (pass ``tokenizer`` if the task needs one, and ``inputs`` if it has none:
    ``inputs(batch) -> model input``). ``data``: calibration batches for gptq / static schemes.
    ``task``: see `lowbit.tasks.resolve_task` (``task_options`` are its options). ``memory=False``
    skips the fresh-process RSS probe. ``workdir``: where the saved models go (default: a
    temporary folder, removed at the end).
    """
    if threads:
        torch.set_num_threads(threads)
    load_avg = os.getloadavg()
    model, tok, model_dir, name = _load_source(model_or_path, tokenizer)
    opts = dict(task_options or {})
    if task == "embeddings":
        opts.setdefault("reference", model)
    the_task = resolve_task(task, model_dir, tok, **opts)
    data = None if data is None else list(data)  # read once: every row's calibration uses it
    plan = _rows_to_run(schemes, method)
    make_input = inputs or (None if tok is None else (lambda b: batch_inputs(tok, b)))
    from .models import side_files
    side = side_files(model_dir) if model_dir is not None else {}
    with tempfile.TemporaryDirectory(prefix="lowbit-compare-") as tmp:
        work = Path(workdir or tmp)
        measured = _measure_rows(model, plan, the_task, data, work, side, memory, progress)
        lat = (time_models({label: m["model"] for label, m in measured.items()},
                           {b: make_input(b) for b in batch}, rounds) if make_input else {})
    return _report(name, the_task, measured, lat, batch, rounds, load_avg,
                   [] if make_input else ["latency not measured: no tokenizer; pass inputs=fn(batch)"])


def _measure_rows(model, plan, task: Task, data, work: Path, side: dict, memory: bool, progress: bool):
    """Quantize, save, load and score each row; each row's memory probe runs in its own fresh
    process beside the next rows' work, and all have finished when this returns (before timing)."""
    from tqdm.auto import tqdm
    out, probes = {}, {}
    bar = tqdm(plan, desc="lowbit compare", unit="scheme", file=sys.stderr, disable=not progress)
    for label, scheme, method in bar:
        bar.set_postfix_str(label)
        folder = work / label.replace(" ", "-")
        loaded, path = _quantize_saved(model, scheme, method, data, folder, side)
        if memory and hasattr(model, "config"):
            probes[label] = start_probe(folder, torch.get_num_threads())
        out[label] = {"scheme": scheme, "method": method, "model": loaded, "bytes": path.stat().st_size,
                      "rss": (None, None), "quality": task(loaded), "speeds": guardrail.layer_speeds(loaded)}
    for label, probe in probes.items():
        out[label]["rss"] = finish_probe(probe)
    return out


def _report(name, task: Task, measured: dict, lat: dict, batch, rounds, load_avg, notes) -> CompareReport:
    fp = measured["fp32"]
    base = fp["quality"][task.metric]
    rows = []
    for label, m in measured.items():
        value = m["quality"][task.metric]
        latency = lat.get(label, ())
        rows.append(CompareRow(
            label, m["scheme"], m["method"], m["bytes"], m["bytes"] / fp["bytes"], m["rss"][0], m["rss"][1],
            latency, dict(m["quality"]), value - base, drop(task, base, value),
            slow_flags(latency, lat.get("fp32", ()), m["speeds"]) if label != "fp32" else (),
            tuple(guardrail.summarize(m["speeds"])[0])))
    return CompareReport(name, task.name, task.metric, task.higher_is_better, cpu_name(),
                         torch.get_num_threads(), torch.__version__, tuple(load_avg), tuple(batch),
                         rounds, tuple(rows), tuple(notes))


__all__ = ["DEFAULT_SCHEMES", "SLOWER_THAN_FP32", "batch_inputs", "compare", "finish_probe", "rss_probe",
           "scheme_recipe", "slow_flags", "slow_reason", "start_probe", "time_models"]
