"""`lowbit demo ctr`: train the DLRM-style model on MovieLens-100k, export its tables at fp32 / 8 /
4 / 2 bits (greedy range), serve each with `lowbit serve` (a subprocess: local table folders, or
Redis when ``tables`` is a redis:// URL), score the test split through `lowbit.serve.Client`, and
print AUC, table bytes, latency and QPS. The AUC is measured on the HTTP answers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import tables as lt
from ..eval.timing import cpu_name
from ..textable import text_table
from . import data, train
from .served import save_served

BITS = (32, 8, 4, 2)
SCORE_BATCH = 500
LATENCY_REQUESTS = 200
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, tables: str | None, port: int, workers: int = 1) -> subprocess.Popen:
    """``lowbit serve`` in a subprocess; returns once /health answers (bounded wait)."""
    from ..serve import Client
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", str(model_dir), "--port", str(port),
           "--workers", str(workers), "--log-level", "warning"]
    cmd += ["--tables", tables] if tables else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    with Client(f"http://127.0.0.1:{port}", timeout_s=2.0) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"lowbit serve exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            try:
                c.health()
                return proc
            except Exception:  # noqa: BLE001  (not up yet)
                time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"lowbit serve did not answer /health within {START_TIMEOUT_S} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: graceful
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def score(url: str, test: data.Split) -> tuple[np.ndarray, dict]:
    """Test-split probabilities through the HTTP client, and batch-1 latency / QPS."""
    from ..serve import Client, split_inputs
    with Client(url) as c:
        probs = np.concatenate([c.predict(split_inputs(test, np.arange(a, min(a + SCORE_BATCH, len(test)))))
                                for a in range(0, len(test), SCORE_BATCH)])
        one = [split_inputs(test, [i]) for i in range(LATENCY_REQUESTS)]
        times = []
        t0 = time.perf_counter()
        for inputs in one:
            t = time.perf_counter()
            c.predict(inputs)
            times.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
    return probs, {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
                   "qps": LATENCY_REQUESTS / wall}


def table_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.lbt"))


def build_variant(model, work: Path, bits: int, tables: str | None) -> tuple[Path, str | None, int]:
    """Tables at ``bits`` (+ pushed to Redis), and the served model folder referring to them."""
    folder = work / f"tables-b{bits}"
    made = lt.export(model, folder, bits=bits, range_method="greedy")
    refs = {name.split(".", 1)[1]: {"table": folder_.name, "url": f"../{folder.name}/{folder_.name}"}
            for name, folder_ in made.items()}
    store = None
    if tables:
        prefix = f"ctr-b{bits}-"
        for f in made.values():
            lt.push(f, tables, name=prefix + f.name)
        store = f"{tables}{'&' if '?' in tables else '?'}prefix={prefix}"
    model_dir = work / f"model-b{bits}"
    save_served(model, model_dir, refs)
    return model_dir, store, table_bytes(folder)


def main(tables: str | None = None, json_path: str | None = None, epochs: int = train.EPOCHS,
         bits: tuple = BITS, work: str | None = None) -> int:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    train_split, test, sizes = data.load()
    say(f"MovieLens-100k: {len(train_split)} train / {len(test)} test ratings (split by time), "
        f"positives {test.label.mean():.3f} of test")
    model = train.train(train_split, sizes, epochs=epochs, log=say)
    ref_auc = train.auc(test.label, train.predict(model, test))
    say(f"in-process AUC (float model, nn.EmbeddingBag): {ref_auc:.4f}")
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for b in bits:
            model_dir, store, nbytes = build_variant(model, Path(tmp), b, tables)
            port = free_port()
            proc = start_server(model_dir, store, port)
            try:
                probs, speed = score(f"http://127.0.0.1:{port}", test)
            finally:
                stop_server(proc)
            rows.append({"bits": b, "table_bytes": nbytes, "auc": train.auc(test.label, probs), **speed})
            say(f"{b}-bit tables: AUC {rows[-1]['auc']:.4f}")
    print_rows(rows, ref_auc, tables, time.perf_counter() - t_start)
    if json_path:
        Path(json_path).write_text(json.dumps({"reference_auc": ref_auc, "rows": rows}, indent=1))
    return 0


def print_rows(rows: list, ref_auc: float, tables: str | None, seconds: float) -> None:
    base = next((r for r in rows if r["bits"] == 32), rows[0])
    head = ["tables", "bytes", "x fp32", "AUC", "AUC loss", "p50 ms", "p99 ms", "QPS"]
    body = [[("fp32" if r["bits"] == 32 else f"{r['bits']}-bit"), f"{r['table_bytes']:,}",
             f"{r['table_bytes'] / base['table_bytes']:.3f}", f"{r['auc']:.4f}", f"{base['auc'] - r['auc']:+.4f}",
             f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['qps']:.0f}"] for r in rows]
    print(f"CTR demo: MovieLens-100k test split, scored through the HTTP client; tables from "
          f"{tables or 'local folders'}; CPU {cpu_name()}; {seconds:.0f} s in all")
    print(f"in-process float model AUC {ref_auc:.4f}; latency and QPS: batch-1 requests, one client")
    print(text_table(head, body, numeric=[False] + [True] * 7))
