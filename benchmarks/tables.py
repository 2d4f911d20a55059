"""Embedding-table lookups and builds, side by side: lowbit's 4-bit table from a local folder
(dense row ids and hashed 64-bit keys; compiled kernels and, beside them, their twins: the numpy
probe and FBGEMM's decode, the path without numba) and from Redis (pipelined, unpipelined, one
command per key), against numpy fancy indexing of an in-memory float32 array (the upper bound, 7x the bytes) and
torch's ``nn.EmbeddingBag`` (float32, one bag per key). Throughput (keys/s, from the median of
interleaved rounds via `lowbit.eval.timing.interleaved`) and per-batch latency p50/p99 (batches
timed one by one, methods taking turns in blocks of 200) for batches of 1, 100 and 1,000 keys;
build rows/s.

    python benchmarks/tables.py --threads 1            # 1M x 64, needs redis-server for the Redis rows
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.eval.timing import interleaved
from lowbit.tables import build, open_table
from lowbit.tables.quant import decode_records
from lowbit.tables.store_redis import connect, push

BATCHES = (1, 100, 1000)
LATENCY_BLOCK = 200  # single batches a method runs in a row when timing latency (a serving loop)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_builds(d: Path, x: np.ndarray, hashed: np.ndarray) -> None:
    n = x.shape[0]
    np.save(d / "x.npy", x)
    rows = [("4-bit min-max, .npy, 1 process", lambda: build(d / "x.npy", d / "dense", bits=4, workers=0, progress=False), n),
            ("4-bit min-max, .npy, 2 shards in 2 processes",
             lambda: build(d / "x.npy", d / "pool", bits=4, shards=2, workers=2, progress=False), n),
            ("4-bit min-max, array + 64-bit keys, 1 process",
             lambda: build(x, d / "hashed", keys=hashed, bits=4, progress=False), n),
            ("4-bit greedy (arXiv 1911.02079), 100k rows, 1 process",
             lambda: build(x[:100_000], d / "greedy", bits=4, range_method="greedy", progress=False), 100_000)]
    print("\n| build | seconds | rows/s |\n|---|---|---|")
    for name, fn, rows_n in rows:
        s = timed(fn)
        print(f"| {name} | {s:.2f} | {rows_n / s / 1e6:.2f}M |")
    doc = open_table(d / "dense").manifest
    print(f"\nbytes: 4-bit records {doc['bytes']['records'] / 2**20:.1f} MiB = "
          f"{doc['bytes']['records'] / doc['bytes']['fp32']:.3f}x of fp32 ({doc['bytes']['fp32'] / 2**20:.0f} MiB); "
          f"key index of the hashed table {open_table(d / 'hashed').manifest['bytes']['keys'] / 2**20:.1f} MiB; "
          f"rmse {doc['error']['rmse']:.4f}, mean error {doc['error']['mean_error']:.2e}")


def start_redis(d: Path):
    if shutil.which("redis-server") is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)], stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            connect(f"redis://127.0.0.1:{port}/0").ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except Exception:  # not up yet: bounded retry, then give up below
            time.sleep(0.05)
    proc.kill()
    return None, None


def methods(x, emb, dense, hashed, hashed_keys, redis_t, batch: int) -> dict:
    """name -> (callable of one batch of keys, key generator)."""
    n = x.shape[0]
    ids = lambda r: r.integers(0, n, batch)  # noqa: E731
    hk = lambda r: hashed_keys[r.integers(0, n, batch)]  # noqa: E731
    offsets = torch.arange(batch)
    m = {"numpy fp32 x[ids] (in memory)": (lambda k: x[k], ids),
         "torch nn.EmbeddingBag fp32": (lambda k: emb(torch.from_numpy(k), offsets), ids),
         "lowbit local, dense ids": (dense.lookup, ids),
         "lowbit local, hashed keys": (hashed.lookup, hk),
         "lowbit local, dense ids, twins (FBGEMM decode, no numba)":
             (lambda k: dense._fused_rows(0, dense.positions(k)[0]), ids),
         "lowbit local, hashed keys, twins (numpy probe, FBGEMM decode)":
             (lambda k: hashed._fused_rows(0, hashed._index.find_twin(k)[0]), hk),
         "lowbit local, numpy decoder (no fused kernel)":
             (lambda k: decode_records(dense.records(dense.positions(k)[0]), dense.layout), ids)}
    if redis_t is not None:
        m["redis, pipelined (1 round trip)"] = (redis_t.lookup, ids)
        m["redis, unpipelined (2 round trips)"] = (lambda k: redis_t.lookup(k, pipelined=False), ids)
        if batch <= 100:
            m["redis, one HGET per key"] = (lambda k: one_by_one(redis_t, k), ids)
    return m


def one_by_one(t, keys) -> list:
    key = f"lowbit:{{{t.name}:{t.version()}:0}}:rows"
    return [t.client.hget(key, int(k).to_bytes(8, "little", signed=True)) for k in keys]


def bench_lookups(x, emb, dense, hashed, hashed_keys, redis_t, rounds: int, samples: int) -> None:
    for batch in BATCHES:
        m = methods(x, emb, dense, hashed, hashed_keys, redis_t, batch)
        rng = np.random.default_rng(batch)
        # batches per timed call: 20k keys (a few ms), long enough that the cache refill after
        # another method's turn and the timer's own cost do not set the figure (2k keys did)
        per_call = 2000 if batch == 1 else 20_000 // batch
        n_pool = max(per_call, 1_000_000 // batch)  # fresh keys each call: cycle through 1M keys
        pools = {name: [gen(rng) for _ in range(n_pool)] for name, (_, gen) in m.items()}
        cursor = {name: 0 for name in m}

        def run(name, f):
            i = cursor[name]
            cursor[name] = (i + per_call) % (n_pool - per_call + 1)
            return [f(k) for k in pools[name][i:i + per_call]]
        fns = {name: (lambda name=name, f=f: run(name, f)) for name, (f, _) in m.items()}
        t = interleaved(fns, rounds=rounds, budget_s=20.0)
        lat = {name: [] for name in m}
        for block in range(0, samples, LATENCY_BLOCK):  # methods take turns in blocks of single batches
            for name, (f, _) in m.items():
                for i in range(block, min(block + LATENCY_BLOCK, samples)):
                    k = pools[name][i % n_pool]
                    t0 = time.perf_counter()
                    f(k)
                    lat[name].append((time.perf_counter() - t0) * 1e6)
        base = t["numpy fp32 x[ids] (in memory)"].median_ms
        print(f"\nbatch of {batch} key(s): throughput from the median of {t[next(iter(t))].rounds} rounds; "
              f"latency over {samples} single batches")
        print("| method | keys/s (median) | keys/s (best) | vs numpy fp32 | p50 us | p99 us |\n|---|---|---|---|---|---|")
        for name in m:
            keys_n = per_call * batch
            med, best = keys_n / t[name].median_ms * 1e3, keys_n / t[name].min_ms * 1e3
            p50, p99 = np.percentile(lat[name], [50, 99])
            print(f"| {name} | {med / 1e6:.2f}M | {best / 1e6:.2f}M | {base / t[name].median_ms:.2f}x | "
                  f"{p50:.1f} | {p99:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--samples", type=int, default=2000, help="single batches timed per method for p50/p99")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} cores visible; table {args.rows} x {args.dim}, 4 bits, fp16 scale/bias")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    hashed_keys = rng.integers(-2 ** 63, 2 ** 63 - 1, args.rows, dtype=np.int64)
    d = Path(tempfile.mkdtemp(prefix="lowbit-bench-tables-"))
    proc = None
    try:
        bench_builds(d, x, hashed_keys)
        dense, hashed = open_table(d / "dense"), open_table(d / "hashed")
        emb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(x), mode="sum")
        proc, url = start_redis(d)
        redis_t = None
        if url:
            s = timed(lambda: push(dense, url, "bench"))
            print(f"\nredis push of {args.rows} rows: {s:.2f} s ({args.rows / s / 1e6:.2f}M rows/s), one server on loopback")
            redis_t = open_table(url + "?name=bench")
        else:
            print("\nredis-server not found: Redis rows skipped")
        with torch.inference_mode():
            bench_lookups(x, emb, dense, hashed, hashed_keys, redis_t,
                          args.rounds, args.samples)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
