"""`build`: a source -> a table folder (see `tables.format`), shard by shard.

Each shard is one independent task (`ShardTask` -> `run_shard`): it reads its own rows from the
source in chunks of ``chunk_rows`` (a dense source is never held whole in memory), quantizes them
(`tables.quant`), writes the shard under a temporary folder and returns its checksum and error sums.
Tasks run inline, in local processes (``engine="local"``, the default) or on a Dask cluster
(``engine="dask://host:port"``; the output folder must then be on a filesystem the workers share).
The same tasks give the same bytes wherever they run. The folder appears under its name only when
complete: temporary folder, every file fsynced, then renamed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from ..primitives.packing import PACKING_VERSION
from ..io.atomic import fsync_path
from .format import (FORMAT_VERSION, MANIFEST_NAME, Layout, TableError, encode_header,
                     shard_name, write_json_atomic)
from .quant import RANGE_METHODS, encode_rows, error_summary, merge_errors, row_errors
from .sources import Source, open_source, read_rows, read_text_rows, rows_sha256

CHUNK_ROWS = 65536
DEFAULT_SHARD_ROWS = 1 << 20
POOL_MIN_ROWS = 1 << 20  # below this, starting worker processes (~2 s each) costs more than it saves


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard needs; picklable, so it runs the same in a process or on Dask."""

    source: Source
    index: int
    start: int  # first row (in key order) of this shard
    stop: int
    layout: Layout
    range_method: str
    key_dtype: str
    folder: str
    chunk_rows: int = CHUNK_ROWS
    keys: np.ndarray | None = field(default=None, repr=False, compare=False)  # sparse: this shard's keys


def run_shard(task: ShardTask) -> dict:
    """Write one shard; return its manifest entry plus error sums."""
    path = Path(task.folder) / shard_name(task.index)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows, keys = task.stop - task.start, task.keys
    first = task.start if keys is None else int(keys[0])
    last = task.stop - 1 if keys is None else int(keys[-1])
    h, src_h, errors, pending = hashlib.sha256(), hashlib.sha256(), [], []
    # hashing and writing release the GIL: one helper thread does them, in order, while the next
    # chunk is quantized
    with open(tmp, "wb") as f, ThreadPoolExecutor(1) as io:
        def put(b: bytes) -> None:
            h.update(b)
            f.write(b)
        pending.append(io.submit(put, encode_header(task.layout, rows, first, keys is not None, task.key_dtype)))
        if keys is not None:
            pending.append(io.submit(put, keys.astype(keys.dtype.newbyteorder("<")).tobytes()))
        for x, records, back, write in _shard_records(task):
            if x is not None:
                errors.append(row_errors(torch.from_numpy(x), back))
                pending.append(io.submit(rows_sha256, x, src_h))
            if write:
                pending.append(io.submit(put, records.tobytes()))
            pending = [p for p in pending if not p.done() or p.result()]  # surface errors early
        for p in pending:
            p.result()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "rows": rows, "first_key": first, "last_key": last,
            "bytes": path.stat().st_size, "sha256": h.hexdigest(),
            "source_sha256": src_h.hexdigest() if task.source.kind != "text" else None,
            "errors": merge_errors(errors)}


def _shard_records(task: ShardTask):
    """Yield (float rows or None, records, decoded rows, write the records now?) in key order."""
    if task.source.kind != "text":
        for a in range(task.start, task.stop, task.chunk_rows):
            x = read_rows(task.source, a, min(a + task.chunk_rows, task.stop))  # (n, dim) float32
            records, back = encode_rows(torch.from_numpy(x), task.layout, task.range_method, first_key=a)
            yield x, records, back, True
        return
    out = np.zeros((task.stop - task.start, task.layout.record_bytes), dtype=np.uint8)
    for pos, x in read_text_rows(task.source, task.keys):
        records, back = encode_rows(torch.from_numpy(x), task.layout, task.range_method,
                                    first_key=task.start + int(pos[0]))
        out[pos] = records
        yield x, records, back, False  # a text shard is written whole once every line is placed
    yield None, out, None, True


def plan_tasks(source: Source, layout: Layout, range_method: str, shards: int | None, folder: str,
               chunk_rows: int = CHUNK_ROWS) -> list[ShardTask]:
    if range_method not in RANGE_METHODS:
        raise TableError(f"range_method must be one of {RANGE_METHODS}, found {range_method!r}")
    n = source.rows
    shards = shards or max(1, -(-n // DEFAULT_SHARD_ROWS))
    if not 1 <= shards <= max(n, 1):
        raise TableError(f"shards must be in 1..{n} for {n} rows, found {shards}")
    dense = is_dense(source)
    base = replace(source, keys=None)
    bounds = [i * n // shards for i in range(shards + 1)]
    return [ShardTask(base, i, bounds[i], bounds[i + 1], layout, range_method, source.key_dtype, folder,
                      chunk_rows, None if dense else source.keys[bounds[i]:bounds[i + 1]])
            for i in range(shards)]


def is_dense(source: Source) -> bool:
    k = source.keys
    return k is None or (k.size > 0 and int(k[0]) == 0 and int(k[-1]) == k.size - 1)


def build(src, out, *, bits: int = 4, range_method: str = "minmax", scale_dtype: str = "float16",
          shards: int | None = None, tensor: str | None = None, engine: str = "local",
          workers: int | None = None, progress: bool = True, overwrite: bool = False,
          chunk_rows: int = CHUNK_ROWS, keys=None) -> dict:
    """Build the table folder ``out`` from ``src``; returns its manifest (with an error summary).
    ``keys``: int64/uint64 keys of an in-memory array's rows (default: the row ids)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise TableError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    source = open_source(src, tensor, keys)
    layout = Layout(source.dim, bits, scale_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tasks = plan_tasks(source, layout, range_method, shards, str(tmp), chunk_rows)
        results = run_tasks(tasks, engine, workers, progress)
        doc = _manifest(source, layout, range_method, tasks, results)
        write_json_atomic(tmp / MANIFEST_NAME, doc)
        fsync_path(tmp)
        _swap_in(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return doc


def _manifest(source: Source, layout: Layout, range_method: str, tasks: list[ShardTask],
              results: list[dict]) -> dict:
    dense = tasks[0].keys is None
    errors = merge_errors([r.pop("errors") for r in results])
    src_hash = hashlib.sha256("".join(r["source_sha256"] or "" for r in results).encode()).hexdigest()
    return {"format": "lowbit-table", "format_version": FORMAT_VERSION, "packing_version": PACKING_VERSION,
            "dim": layout.dim, "bits": layout.bits, "record_bytes": layout.record_bytes,
            "scale_dtype": layout.scale_dtype if layout.quantized else None,
            "range_method": range_method if layout.quantized else None,
            "key_dtype": tasks[0].key_dtype, "dense_keys": dense, "rows": source.rows,
            "shards": results, "source": source.describe(),
            "source_sha256": src_hash if source.kind != "text" else _file_sha(source.path),
            "bytes": {"records": source.rows * layout.record_bytes, "keys": 0 if dense else 8 * source.rows,
                      "total": sum(r["bytes"] for r in results),
                      "fp32": source.rows * layout.dim * 4},
            "error": error_summary(errors),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _file_sha(path: str) -> str:
    from .format import file_sha256
    return file_sha256(Path(path))


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: no oversubscription


def run_tasks(tasks: list[ShardTask], engine: str, workers: int | None, progress: bool) -> list[dict]:
    """Run shard tasks inline, in local processes, or on Dask; results in shard order."""
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(t.stop - t.start for t in tasks), unit="row", disable=not progress,
               desc="build table")
    results = {}
    try:
        for task, res in _execute(tasks, engine, workers):
            results[task.index] = res
            bar.update(task.stop - task.start)
    finally:
        bar.close()
    return [results[i] for i in sorted(results)]


def _execute(tasks: list[ShardTask], engine: str, workers: int | None):
    if engine.startswith(("dask://", "tcp://")):
        yield from _execute_dask(tasks, "tcp://" + engine.split("://", 1)[1])
        return
    if engine != "local":
        raise TableError(f"engine must be 'local' or 'dask://host:port', found {engine!r}")
    if workers is None:
        rows = sum(t.stop - t.start for t in tasks)
        workers = min(len(tasks), os.cpu_count() or 1) if rows >= POOL_MIN_ROWS else 0
    if workers <= 1 or len(tasks) == 1 or tasks[0].source.kind == "array":
        for t in tasks:
            yield t, run_shard(t)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as ex:
        futures = {ex.submit(run_shard, t): t for t in tasks}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _execute_dask(tasks: list[ShardTask], address: str):
    try:
        from distributed import Client, as_completed as dask_completed
    except ImportError:
        raise TableError("engine dask://... needs dask.distributed: pip install 'lowbit[tables]'") from None
    with Client(address, timeout="10s") as client:
        futures = client.map(run_shard, tasks, pure=False)
        index = {f.key: t for f, t in zip(futures, tasks)}
        for fut in dask_completed(futures):
            yield index[fut.key], fut.result()


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise TableError(f"{out}: appeared while building; not replaced")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old)
