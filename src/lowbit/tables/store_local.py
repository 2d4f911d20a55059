"""`LocalTable`: lookups from a table folder whose shards are memory-mapped (read-only).

Opening checks the manifest against every shard (header, size, and by default the sha256 of its
bytes) before any lookup, so a corrupted or truncated shard fails with an error naming the shard.
A lookup is vectorized: keys -> row positions (dense tables: the key is the position; otherwise a
hash index over the sorted keys), gather the asked records, decode only those (one compiled
loop, `jit_kernels.gather_decode`, or FBGEMM's row-wise kernel, or `quant.decode_records`).
Nothing is mutated after open, so one table is safe to share across threads.
"""
from __future__ import annotations

import hashlib
import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

from .format import (HEADER_BYTES, TableError, decode_header, file_sha256, layout_of, read_manifest,
                     shard_bytes)
from ..kernels import jit
from . import jit_kernels
from .index import KeyIndex
from .quant import decode_records, decode_reference, fused_rowwise_op

MISSING_MODES = ("error", "zeros", "default")
MAX_NAMED_MISSING = 10
OFFSETS_CACHE = 1 << 14  # one bag per key: offsets 0..n-1, made once


class LocalTable:
    """A table folder opened for lookup. ``verify``: "sha256" (default) or "size" (huge tables)."""

    def __init__(self, path, verify: str = "sha256") -> None:
        if verify not in ("sha256", "size"):
            raise TableError(f"verify must be 'sha256' or 'size', found {verify!r}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.layout = layout_of(self.manifest)
        self.dim, self.rows = self.layout.dim, self.manifest["rows"]
        self.key_dtype = np.dtype(self.manifest["key_dtype"])
        self.dense = bool(self.manifest["dense_keys"])
        shards = [self._open_shard(e, verify) for e in self.manifest["shards"]]
        if sum(r.shape[0] for _, r in shards) != self.rows:
            raise TableError(f"{self.path}: shards hold {sum(r.shape[0] for _, r in shards)} rows, "
                             f"the manifest says {self.rows}")
        self._records = [r for _, r in shards]
        self._starts = np.cumsum([0] + [r.shape[0] for r in self._records])[:-1]  # (shards,)
        self._keys = None if self.dense else np.concatenate([k for k, _ in shards])
        if self._keys is not None and self._keys.size > 1 and not (self._keys[1:] > self._keys[:-1]).all():
            raise TableError(f"{self.path}: keys are not sorted and unique across shards")
        self._index = None if self.dense else KeyIndex(self._keys)
        self._fused = fused_rowwise_op(self.layout)
        with warnings.catch_warnings():  # the maps are read-only; the kernel only reads them
            warnings.simplefilter("ignore", UserWarning)
            self._weights = [torch.from_numpy(r) for r in self._records]
        self._offsets = torch.arange(OFFSETS_CACHE, dtype=torch.int64)

    def _open_shard(self, entry: dict, verify: str) -> tuple[np.ndarray | None, np.ndarray]:
        name = entry["file"]
        path = self.path / name
        if not path.is_file():
            raise TableError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        want = shard_bytes(self.layout, entry["rows"], not self.dense)
        if size != want or size != entry["bytes"]:
            raise TableError(f"{path}: shard is {size} bytes, expected {want} (truncated or damaged)")
        with open(path, "rb") as f:
            head = decode_header(f.read(HEADER_BYTES), str(path))
        expect = {"bits": self.layout.bits, "dim": self.dim, "record_bytes": self.layout.record_bytes,
                  "rows": entry["rows"], "keys_stored": not self.dense, "key_dtype": str(self.key_dtype),
                  "first_key": entry["first_key"]}
        for k, v in expect.items():
            if head[k] != v:
                raise TableError(f"{path}: header {k} = {head[k]!r}, the manifest says {v!r}")
        if verify == "sha256" and file_sha256(path) != entry["sha256"]:
            raise TableError(f"{path}: sha256 does not match the manifest (the shard was damaged or edited)")
        return self._map(path, entry["rows"])

    def _map(self, path: Path, rows: int) -> tuple[np.ndarray | None, np.ndarray]:
        with open(path, "rb") as f:  # a plain ndarray over a read-only map (np.memmap adds ~10 us a gather)
            mm = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        off = HEADER_BYTES
        keys = None
        if not self.dense:
            keys = mm[off:off + 8 * rows].view(self.key_dtype.newbyteorder("<"))  # (rows,)
            off += 8 * rows
        return keys, mm[off:].reshape(rows, self.layout.record_bytes)  # (rows, record_bytes)

    # -- lookup ------------------------------------------------------------------------------
    def positions(self, keys, reference: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Row positions (int64) of ``keys`` (flat) and a found mask (None when all are found).
        ``reference``: binary search instead of the hash index (the plain twin)."""
        k = np.asarray(keys).reshape(-1)
        if k.dtype != self.key_dtype:
            k = _cast_keys(k, self.key_dtype)
        if not self.dense and not reference:
            return self._index.find(k)
        if not self.dense:
            pos, ok = self._index.find_reference(k)
            return pos, (None if ok.all() else ok)
        ok = k.view(np.uint64) < self.rows if self.key_dtype == np.int64 else k < self.rows
        if ok.all():
            return k.astype(np.int64, copy=False), None
        return np.where(ok, k, 0).astype(np.int64), ok

    def records(self, pos: np.ndarray) -> np.ndarray:
        """Gather records (n, record_bytes) at row positions."""
        if len(self._records) == 1:
            return self._records[0][pos]
        shard = np.searchsorted(self._starts, pos, side="right") - 1
        out = np.empty((pos.size, self.layout.record_bytes), dtype=np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._records[s][pos[sel] - self._starts[s]]
        return out

    def _decode_at(self, pos: np.ndarray) -> np.ndarray:
        """Decoded rows (n, dim) at positions, read from the maps: the compiled gather + decode
        (`jit_kernels.gather_decode`) for 4/2-bit float16 layouts when compiled kernels are on,
        else FBGEMM's fused kernel when it reads this layout (the compiled one's twin), else
        gather + `decode_records`."""
        if self._fused is None:
            return decode_records(self.records(pos), self.layout)
        compiled = jit.kernel("gather_decode", pos.size * self.dim, define=jit_kernels.define)
        rows = self._fused_rows if compiled is None else (
            lambda s, p: compiled(self._records[s], p, self.dim, self.layout.bits))
        if len(self._weights) == 1:
            return rows(0, pos)
        shard = np.searchsorted(self._starts, pos, side="right") - 1
        out = np.empty((pos.size, self.dim), dtype=np.float32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = rows(s, pos[sel] - self._starts[s])
        return out

    def _fused_rows(self, shard: int, pos: np.ndarray) -> np.ndarray:
        n = pos.size
        offsets = self._offsets[:n] if n <= OFFSETS_CACHE else torch.arange(n, dtype=torch.int64)
        out = self._fused(self._weights[shard], torch.from_numpy(pos), offsets,
                          False, 0, False, None, None, False).numpy()  # sum of one row per bag
        return out if out.shape[1] == self.dim else out[:, :self.dim]

    def lookup(self, keys, on_missing: str = "error", default=None) -> np.ndarray:
        """float32 (n, dim) rows for ``keys`` (any int shape, flattened). Missing keys raise a
        TableError naming them, or give zeros (``on_missing="zeros"``) or ``default`` (a (dim,) row)."""
        pos, ok = self.positions(keys)
        out = self._decode_at(pos)
        if ok is not None:
            _fill_missing(out, keys, ok, on_missing, default, self.dim, str(self.path))
        return out

    def lookup_versioned(self, keys, on_missing: str = "error", default=None) -> tuple[np.ndarray, str]:
        """`lookup` plus this folder's version (a folder never changes; see `version`)."""
        return self.lookup(keys, on_missing, default), self.version()

    def version(self) -> str:
        """``local:`` + the first 12 hex digits of the SHA-256 over the shards' SHA-256s: the same
        rows give the same version wherever the folder is copied."""
        digests = "".join(e["sha256"] for e in self.manifest["shards"]).encode()
        return "local:" + hashlib.sha256(digests).hexdigest()[:12]

    def lookup_reference(self, keys, on_missing: str = "error", default=None) -> torch.Tensor:
        """The plain twin of `lookup` (torch decode)."""
        pos, ok = self.positions(keys, reference=True)
        out = decode_reference(torch.from_numpy(self.records(pos).copy()), self.layout).numpy()
        if ok is not None:
            _fill_missing(out, keys, ok, on_missing, default, self.dim, str(self.path))
        return torch.from_numpy(out)

    def keys(self) -> np.ndarray:
        return np.arange(self.rows, dtype=np.int64) if self._keys is None else self._keys

    def iter_records(self, batch: int = 65536):
        """Yield (keys, records) batches in key order (for pushing to a store)."""
        for start, recs in zip(self._starts, self._records):
            for a in range(0, recs.shape[0], batch):
                b = min(a + batch, recs.shape[0])
                ks = (np.arange(start + a, start + b, dtype=np.int64) if self._keys is None
                      else self._keys[start + a:start + b])
                yield ks, np.asarray(recs[a:b])

    def __repr__(self) -> str:
        return f"LocalTable({str(self.path)!r}, rows={self.rows}, dim={self.dim}, bits={self.layout.bits})"


def _cast_keys(k: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if k.dtype.kind not in "iu":
        raise TableError(f"keys must be integers, found {k.dtype}")
    if k.size and k.dtype.kind == "i" and dtype == np.uint64 and int(k.min()) < 0:
        raise TableError(f"key {int(k.min())} is negative; this table's keys are uint64")
    if k.size and k.dtype == np.uint64 and dtype == np.int64 and int(k.max()) > np.iinfo(np.int64).max:
        raise TableError(f"key {int(k.max())} does not fit this table's int64 keys")
    return k.astype(dtype)


def _fill_missing(out: np.ndarray, keys, ok: np.ndarray, on_missing: str, default, dim: int,
                  where: str) -> None:
    if on_missing not in MISSING_MODES:
        raise TableError(f"on_missing must be one of {MISSING_MODES}, found {on_missing!r}")
    if on_missing == "error":
        missing = np.asarray(keys).reshape(-1)[~ok]
        named = ", ".join(str(int(m)) for m in missing[:MAX_NAMED_MISSING])
        more = f" and {missing.size - MAX_NAMED_MISSING} more" if missing.size > MAX_NAMED_MISSING else ""
        raise TableError(f"{where}: {missing.size} key(s) not in the table: {named}{more}")
    if on_missing == "zeros":
        out[~ok] = 0.0
        return
    row = np.asarray(default, dtype=np.float32).reshape(-1) if default is not None else None
    if row is None or row.size != dim:
        raise TableError(f"on_missing='default' needs default= a row of {dim} floats, found "
                         f"{None if row is None else row.size}")
    out[~ok] = row
