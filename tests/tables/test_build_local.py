"""Build from every source kind, and local lookup: dense and hashed keys, missing and duplicate keys,
damaged shards, atomic writes, threads, and a streaming build under a memory limit."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.tables import LocalTable, TableError, build, open_table

ROWS, DIM = 3000, 16
ERR_4BIT = 0.1  # max |error| of 4-bit rows of N(0, 1)-ish values (range ~7 sigma / 15 / 2 = 0.23 worst)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((ROWS, DIM)) * 0.3).astype(np.float32)
    keys = np.unique(rng.integers(0, 2 ** 64 - 1, 2 * ROWS, dtype=np.uint64))[:ROWS]
    keys[-1] = 2 ** 64 - 1  # above int64: the table must keep uint64 keys
    return x, keys


def write_text(path: Path, keys, x) -> Path:
    path.write_text("".join(f"{int(k)}\t{','.join(repr(float(v)) for v in row)}\n" for k, row in zip(keys, x)))
    return path


@pytest.fixture(scope="module")
def dense_table(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    np.save(d / "x.npy", data[0])
    build(d / "x.npy", d / "t", bits=4, shards=3, progress=False, workers=0)
    return d / "t"


def test_dense_lookup_close_to_source(dense_table, data):
    t = open_table(dense_table)
    keys = np.array([0, 17, 2999, 1500, 17])
    assert t.lookup(keys).shape == (5, DIM) and t.manifest["dense_keys"] and t.manifest["bytes"]["keys"] == 0
    assert np.abs(t.lookup(keys) - data[0][keys]).max() < ERR_4BIT
    assert np.array_equal(t.lookup(keys), t.lookup_reference(keys).numpy())


def test_hashed_uint64_keys_from_text(data, tmp_path):
    x, keys = data
    write_text(tmp_path / "x.tsv", keys, x)
    doc = build(tmp_path / "x.tsv", tmp_path / "t", bits=8, shards=4, progress=False, workers=0)
    assert doc["key_dtype"] == "uint64" and not doc["dense_keys"] and doc["bytes"]["keys"] == 8 * ROWS
    t = open_table(tmp_path / "t")
    pick = np.array([5, 2999, 0, 1234])
    assert np.abs(t.lookup(keys[pick]) - x[pick]).max() < 0.01
    assert np.array_equal(t.lookup(keys[pick]), t.lookup_reference(keys[pick]).numpy())


def test_safetensors_and_model_folder_sources(data, tmp_path):
    from safetensors.torch import save_file
    x = data[0]
    (tmp_path / "m").mkdir()
    save_file({"emb.weight": torch.from_numpy(x).half(), "other": torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors"))
    build(tmp_path / "m" / "model.safetensors", tmp_path / "a", bits=32, tensor="emb.weight", progress=False)
    build(tmp_path / "m", tmp_path / "b", bits=32, tensor="emb.weight", progress=False)
    want = torch.from_numpy(x).half().float().numpy()
    for name in "ab":
        assert np.array_equal(open_table(tmp_path / name).lookup(np.arange(ROWS)), want)
    with pytest.raises(TableError, match="no tensor 'nope'"):
        build(tmp_path / "m", tmp_path / "c", tensor="nope", progress=False)


def test_duplicate_key_is_named(tmp_path):
    (tmp_path / "x.tsv").write_text("5\t1,2\n9\t3,4\n5\t5,6\n")
    with pytest.raises(TableError, match="duplicate key 5"):
        build(tmp_path / "x.tsv", tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_missing_keys_error_zeros_default(dense_table):
    t = open_table(dense_table)
    with pytest.raises(TableError, match=r"2 key\(s\) not in the table: 3000, -1"):
        t.lookup([1, 3000, -1])
    z = t.lookup([1, 3000], on_missing="zeros")
    assert np.array_equal(z[1], np.zeros(DIM, np.float32)) and np.array_equal(z[0], t.lookup([1])[0])
    d = t.lookup([3000, 2], on_missing="default", default=np.full(DIM, 7.0))
    assert np.array_equal(d[0], np.full(DIM, 7.0, np.float32))
    with pytest.raises(TableError, match="on_missing must be one of"):
        t.lookup([3000], on_missing="skip")


def test_corrupted_and_truncated_shards_are_named(dense_table, tmp_path):
    import shutil
    for damage in ("flip", "truncate"):
        copy = tmp_path / damage
        shutil.copytree(dense_table, copy)
        shard = copy / "shard-00001.lbt"
        raw = bytearray(shard.read_bytes())
        if damage == "flip":
            raw[100] ^= 0x10
        else:
            raw = raw[:-3]
        shard.write_bytes(bytes(raw))
        with pytest.raises(TableError, match=r"shard-00001.lbt: (sha256 does not match|shard is .* \(truncated)"):
            LocalTable(copy)


def test_build_is_atomic_and_refuses_to_overwrite(data, tmp_path):
    bad = data[0].copy()
    bad[2500, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(TableError, match="row 2500 .*NaN"):
        build(tmp_path / "bad.npy", tmp_path / "t", progress=False, chunk_rows=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]  # no half-written folder
    np.save(tmp_path / "x.npy", data[0])
    build(tmp_path / "x.npy", tmp_path / "t", progress=False)
    with pytest.raises(TableError, match="already exists"):
        build(tmp_path / "x.npy", tmp_path / "t", progress=False)
    build(tmp_path / "x.npy", tmp_path / "t", bits=8, overwrite=True, progress=False)
    assert open_table(tmp_path / "t").layout.bits == 8


def test_shard_count_does_not_change_lookups(data, dense_table, tmp_path):
    np.save(tmp_path / "x.npy", data[0])
    build(tmp_path / "x.npy", tmp_path / "one", bits=4, shards=1, progress=False)
    keys = np.random.default_rng(1).integers(0, ROWS, 500)
    assert np.array_equal(open_table(tmp_path / "one").lookup(keys), open_table(dense_table).lookup(keys))


def test_lookup_is_thread_safe(dense_table):
    t = open_table(dense_table)
    batches = [np.random.default_rng(i).integers(0, ROWS, 100) for i in range(32)]
    want = [t.lookup(b) for b in batches]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(t.lookup, batches * 4))
    assert all(np.array_equal(g, want[i % 32]) for i, g in enumerate(got))


def test_process_pool_build_equals_inline_build(data, tmp_path):
    np.save(tmp_path / "x.npy", data[0])
    build(tmp_path / "x.npy", tmp_path / "a", shards=2, workers=0, progress=False)
    build(tmp_path / "x.npy", tmp_path / "b", shards=2, workers=2, progress=False)
    for i in range(2):
        name = f"shard-{i:05d}.lbt"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


MEMORY_LIMIT_SCRIPT = textwrap.dedent("""
    import resource, sys, numpy as np, torch
    torch.set_num_threads(1)
    from lowbit.tables import build
    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    src, out, extra, source_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    build(np.ones((10, 64), np.float32), out + ".warm", bits=4, progress=False)  # load every library first
    limit = vm_bytes() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        np.ones(source_bytes // 4, np.float32)  # the limit bites: the whole source would not fit
        sys.exit("limit not enforced")
    except MemoryError:
        pass
    build(src, out, bits=4, workers=0, progress=False, chunk_rows=8192)
    print("ok")
""")


def test_streaming_build_under_a_memory_limit(tmp_path):
    """The source (64 MB of float32) is larger than the memory the build may add (40 MB)."""
    rows, dim, extra = 256_000, 64, 40 << 20
    arr = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    arr[:] = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    arr.flush()
    del arr
    src = str(Path(__file__).resolve().parents[2] / "src")
    res = subprocess.run([sys.executable, "-c", MEMORY_LIMIT_SCRIPT, str(tmp_path / "big.npy"),
                          str(tmp_path / "t"), str(extra), str(rows * dim * 4)], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "MALLOC_ARENA_MAX": "1"})  # no 64 MB per-thread arenas: VmSize stays honest
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    t = open_table(tmp_path / "t")
    big = np.load(tmp_path / "big.npy", mmap_mode="r")
    assert t.rows == rows and np.abs(t.lookup([0, rows - 1]) - big[[0, rows - 1]]).max() < 0.3


@pytest.mark.parametrize("bits, dim, scale_dtype", [(4, 5, "float16"), (2, 6, "float16"), (4, 8, "float32"),
                                                    (8, 3, "float16")])
def test_fast_lookup_matches_reference_twin(bits, dim, scale_dtype, tmp_path):
    """Fused kernel (4/2 bits, fp16 params) or numpy decoder, and hash index vs binary search."""
    rng = np.random.default_rng(bits * dim)
    x = rng.standard_normal((700, dim)).astype(np.float32)
    keys = np.unique(rng.integers(-2 ** 63, 2 ** 63 - 1, 800, dtype=np.int64))[:700]
    write_text(tmp_path / "x.tsv", keys, x)
    np.save(tmp_path / "x.npy", x)
    build(tmp_path / "x.tsv", tmp_path / "s", bits=bits, scale_dtype=scale_dtype, shards=3, progress=False)
    build(tmp_path / "x.npy", tmp_path / "d", bits=bits, scale_dtype=scale_dtype, shards=2, progress=False)
    for name, q in (("s", keys[rng.integers(0, 700, 300)]), ("d", rng.integers(0, 700, 300))):
        t = open_table(tmp_path / name)
        assert np.array_equal(t.lookup(q), t.lookup_reference(q).numpy())
    assert (open_table(tmp_path / "d")._fused is not None) == (bits in (2, 4) and scale_dtype == "float16")


def test_array_with_keys_equals_text_build(data, tmp_path):
    x, keys = data
    write_text(tmp_path / "x.tsv", keys, x)
    build(tmp_path / "x.tsv", tmp_path / "text", bits=4, shards=2, progress=False)
    perm = np.random.default_rng(5).permutation(ROWS)  # any row order: the build sorts by key
    build(x[perm], tmp_path / "array", keys=keys[perm], bits=4, shards=2, progress=False)
    for i in range(2):
        name = f"shard-{i:05d}.lbt"
        assert (tmp_path / "text" / name).read_bytes() == (tmp_path / "array" / name).read_bytes()
    with pytest.raises(TableError, match="duplicate key"):
        build(x[:3], tmp_path / "dup", keys=np.array([4, 9, 4]), progress=False)
