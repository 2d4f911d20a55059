"""``lowbit table build | inspect | lookup | push``: arguments -> the `lowbit.tables` functions.

Registered by `lowbit.cli` through `add_parser`. Flags are spelled like the Python arguments
(``--bits``, ``--range`` -> range_method, ``--scale-dtype``, ``--shards``, ``--tensor``, ``--engine``).
"""
from __future__ import annotations

import argparse
import time

SCALE_DTYPES = {"fp16": "float16", "fp32": "float32", "float16": "float16", "float32": "float32"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("table", help="embedding tables: build, inspect, lookup, push to Redis")
    sub = t.add_subparsers(dest="table_command", required=True)
    b = sub.add_parser("build", help="quantize a table source into a table folder")
    b.add_argument("src", help=".npy, .safetensors, a model folder, or a text file of key<TAB>v1,v2,...")
    b.add_argument("out", help="output table folder (written atomically)")
    b.add_argument("--bits", type=int, default=4, choices=(2, 4, 8, 16, 32), help="32 and 16: raw floats")
    b.add_argument("--range", dest="range_method", default="minmax", choices=("minmax", "greedy"),
                   help="per-row range: min-max, or the greedy search of arXiv 1911.02079")
    b.add_argument("--scale-dtype", default="fp16", choices=sorted(SCALE_DTYPES))
    b.add_argument("--shards", type=int, default=None, help="default: one per 1M rows")
    b.add_argument("--tensor", default=None, help="tensor name (.safetensors or model folder sources)")
    b.add_argument("--engine", default="local", help="local (processes) or dask://HOST:PORT")
    b.add_argument("--workers", type=int, default=None, help="local processes (0: inline)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    i = sub.add_parser("inspect", help="rows, dim, bits, bytes, shards, checksums, error summary")
    i.add_argument("table")
    lk = sub.add_parser("lookup", help="print rows of a table folder or redis:// URL")
    lk.add_argument("table", help="a table folder, redis://host:port/db?name=X or redis+cluster://host:port?name=X")
    lk.add_argument("keys", nargs="+", type=int)
    lk.add_argument("--missing", dest="on_missing", default="error", choices=("error", "zeros"))
    p = sub.add_parser("push", help="push a table folder to Redis as a new version")
    p.add_argument("table")
    p.add_argument("url", help="redis://host:port/db or redis+cluster://host:port")
    p.add_argument("--name", default=None, help="table name in Redis (or ?name= in the URL)")
    p.add_argument("--grace-s", type=float, default=60.0, help="keep retired versions this long")
    p.add_argument("--buckets", type=int, default=None, help="row hashes per version (default 1; cluster 16)")
    t.set_defaults(table_func=run)
    return t


def run(args: argparse.Namespace) -> int:
    return {"build": _build, "inspect": _inspect, "lookup": _lookup, "push": _push}[args.table_command](args)


def _build(args) -> int:
    from . import build
    t0 = time.perf_counter()
    doc = build(args.src, args.out, bits=args.bits, range_method=args.range_method,
                scale_dtype=SCALE_DTYPES[args.scale_dtype], shards=args.shards, tensor=args.tensor,
                engine=args.engine, workers=args.workers, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: {doc['rows']} rows x {doc['dim']} at {doc['bits']} bits in "
          f"{len(doc['shards'])} shard(s), {dt:.2f} s ({doc['rows'] / dt / 1e6:.2f}M rows/s)")
    print(_summary(doc))
    return 0


def _summary(doc: dict) -> str:
    b, e = doc["bytes"], doc["error"]
    return "\n".join([
        f"bytes: {b['total']} on disk = records {b['records']} + key index {b['keys']} "
        f"(+ headers); {b['records'] / b['fp32']:.3f}x of fp32 rows ({b['fp32']})",
        f"error: mean {e['mean_error']:.3g}, rmse {e['rmse']:.4g}, max |err| {e['max_abs_error']:.4g}, "
        f"sqnr {e['sqnr_db']:.2f} dB; per-row rmse mean {e['row_rmse_mean']:.4g}, max {e['row_rmse_max']:.4g}"])


def _inspect(args) -> int:
    from . import LocalTable
    t = LocalTable(args.table)  # verifies every shard's size, header and sha256
    doc = t.manifest
    print(f"{args.table}: format {doc['format_version']}, {doc['rows']} rows x {doc['dim']}, {doc['bits']} bits, "
          f"scale {doc['scale_dtype']}, range {doc['range_method']}, keys {doc['key_dtype']}"
          f"{' (dense 0..N-1, no index)' if doc['dense_keys'] else ''}, created {doc['created']}")
    print(_summary(doc))
    for s in doc["shards"]:
        print(f"  {s['file']}: {s['rows']} rows, keys {s['first_key']}..{s['last_key']}, {s['bytes']} bytes, "
              f"sha256 {s['sha256'][:16]}... ok")
    return 0


def _lookup(args) -> int:
    import numpy as np
    from . import open as open_table
    rows = open_table(args.table).lookup(np.array(args.keys), on_missing=args.on_missing)
    for k, r in zip(args.keys, rows):
        print(f"{k}\t" + ",".join(f"{v:.6g}" for v in r))
    return 0


def _push(args) -> int:
    from .store_redis import push
    t0 = time.perf_counter()
    v = push(args.table, args.url, args.name, grace_s=args.grace_s, buckets=args.buckets)
    print(f"pushed {args.table} as version {v} of {args.name or args.url} in {time.perf_counter() - t0:.2f} s")
    return 0
