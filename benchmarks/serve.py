"""`lowbit serve` under load on loopback: fp32 vs 8-bit vs 4-bit tables, from local folders and
from Redis, at 1, 8 and 32 concurrent clients. Every variant is a `lowbit serve` process of its own
(all up at once); the load generator (asyncio + httpx, one process) runs the variants in turn, level
by level, round by round, each slice bounded in time and request count. Requests: POST /predict
with ``--batch`` MovieLens-100k test samples each (pre-encoded JSON bodies, cycled). Reported per
variant and level: QPS (requests/s; median and min over rounds), latency p50/p99 over all rounds'
requests, errors (non-200 answers and failed connections), requests; then QPS ratios to fp32.

    python benchmarks/serve.py                       # needs redis-server on PATH for the Redis rows
    python benchmarks/serve.py --levels 32 --seconds 20 --rounds 3 --bits 32 4 --stores local   # soak
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit import tables as lt
from lowbit.ctr import data, train
from lowbit.ctr.demo import free_port, start_server, stop_server
from lowbit.ctr.served import save_served
from lowbit.eval.timing import cpu_name
from lowbit.serve import split_inputs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[32, 8, 4])
    p.add_argument("--stores", nargs="+", default=["local", "redis"], choices=["local", "redis"])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one slice (variant x level)")
    p.add_argument("--max-requests", type=int, default=5000, help="cap of one slice")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per request")
    p.add_argument("--workers", type=int, default=1, help="lowbit serve --workers")
    return p.parse_args()


async def slice_load(url: str, bodies: list[bytes], clients: int, seconds: float, cap: int) -> dict:
    """``clients`` loops posting bodies until ``seconds`` pass or ``cap`` requests were sent."""
    import httpx
    lat, errors, sent = [], 0, 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        stop_at = time.perf_counter() + seconds

        async def loop(k: int):
            nonlocal errors, sent
            while time.perf_counter() < stop_at and sent < cap:
                sent += 1
                body = bodies[(k * 7919 + sent) % len(bodies)]
                t = time.perf_counter()
                try:
                    r = await c.post("/predict", content=body, headers={"content-type": "application/json"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.append((time.perf_counter() - t) * 1e3)
                errors += not ok
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"lat": lat, "errors": errors, "qps": len(lat) / wall}


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True).stdout.strip() != "PONG":
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def prepare(work: Path, bits_list, stores, redis_url):
    """Served model folders (and Redis pushes) for each variant: {(store, bits): (dir, tables URL)}."""
    _, test, sizes = data.load()
    model = train.DLRM(train.config_for(sizes), generator=torch.Generator().manual_seed(0)).eval()
    variants, table_bytes = {}, {}
    for bits in bits_list:
        made = lt.export(model, work / f"tables-b{bits}", bits=bits, range_method="greedy")
        table_bytes[bits] = sum(f.stat().st_size for f in (work / f"tables-b{bits}").rglob("*.lbt"))
        refs = {n.split(".", 1)[1]: {"table": f.name, "url": f"../tables-b{bits}/{f.name}"} for n, f in made.items()}
        save_served(model, work / f"model-b{bits}", refs)
        if "local" in stores:
            variants[("local", bits)] = (work / f"model-b{bits}", None)
        if "redis" in stores:
            for f in made.values():
                lt.push(f, redis_url, name=f"b{bits}-{f.name}")
            variants[("redis", bits)] = (work / f"model-b{bits}", f"{redis_url}?prefix=b{bits}-")
    return variants, table_bytes, test


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lowbit-serve-bench-"))
    redis_proc = redis_url = None
    if "redis" in args.stores and shutil.which("redis-server") is None:
        print("redis-server not found: local stores only")
        args.stores = ["local"]
    servers = {}
    try:
        if "redis" in args.stores:
            redis_proc, redis_url = start_redis(work)
        variants, table_bytes, test = prepare(work, args.bits, args.stores, redis_url)
        rng = np.random.default_rng(0)
        bodies = [json.dumps({"inputs": split_inputs(test, rng.integers(0, len(test), args.batch))}).encode()
                  for _ in range(256)]
        for key, (folder, store) in variants.items():
            port = free_port()
            servers[key] = (start_server(folder, store, port, args.workers), f"http://127.0.0.1:{port}")
        results = run_rounds(args, servers, bodies)
        report(args, results, table_bytes)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def run_rounds(args, servers: dict, bodies: list[bytes]) -> dict:
    results = {(k, lvl): {"lat": [], "errors": 0, "qps": []} for k in servers for lvl in args.levels}
    for key, (_, url) in servers.items():  # warm-up: one short slice each
        asyncio.run(slice_load(url, bodies, 1, 0.3, 50))
    for _ in range(args.rounds):
        for lvl in args.levels:
            for key, (_, url) in servers.items():
                r = asyncio.run(slice_load(url, bodies, lvl, args.seconds, args.max_requests))
                acc = results[(key, lvl)]
                acc["lat"] += r["lat"]
                acc["errors"] += r["errors"]
                acc["qps"].append(r["qps"])
    return results


def report(args, results: dict, table_bytes: dict) -> None:
    print(f"# lowbit serve load test: CPU {cpu_name()}, torch {torch.__version__}, server torch threads 1, "
          f"--workers {args.workers}, batch {args.batch} samples/request, {args.rounds} rounds x "
          f"{args.seconds:g} s slices (cap {args.max_requests} requests), client: asyncio + httpx in one process\n")
    print("| store | tables | table bytes | clients | QPS median | QPS min | p50 ms | p99 ms | errors | requests |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (key, lvl), r in results.items():
        store, bits = key
        lat = np.array(r["lat"])
        name = "fp32" if bits == 32 else f"{bits}-bit"
        print(f"| {store} | {name} | {table_bytes[bits]:,} | {lvl} | {statistics.median(r['qps']):.0f} | "
              f"{min(r['qps']):.0f} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
              f"{r['errors']} | {lat.size} |")
    print("\nQPS (median) relative to fp32 tables of the same store and level:")
    for (key, lvl), r in results.items():
        base = results.get(((key[0], 32), lvl))
        if key[1] != 32 and base:
            print(f"  {key[0]:5s} {key[1]}-bit, {lvl:2d} clients: "
                  f"{statistics.median(r['qps']) / statistics.median(base['qps']):.2f}x")


if __name__ == "__main__":
    main()
