"""Where a table's rows come from: .npy, .safetensors (+ tensor name), a lowbit or transformers
model folder (+ tensor name), a text file of ``key<TAB>v1,v2,...`` lines, or an in-memory array.

Dense sources (keys = row index) are read in row slices, so a build streams them; a text file is
scanned once for its keys (8 bytes each: sorted, checked for duplicates) and each shard task then
scans the file again for its own key range. Nothing is unpickled (``np.load(allow_pickle=False)``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .format import TableError

INT64_MAX = (1 << 63) - 1
TEXT_CHUNK_LINES = 65536


@dataclass(frozen=True)
class Source:
    """A validated source. ``keys`` is None for dense sources, else the sorted unique keys."""

    kind: str  # "npy" | "safetensors" | "text" | "array"
    path: str
    tensor: str | None
    rows: int
    dim: int
    keys: np.ndarray | None = field(default=None, repr=False, compare=False)
    array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def key_dtype(self) -> str:
        return "int64" if self.keys is None else str(self.keys.dtype)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": Path(self.path).name, "tensor": self.tensor}


def open_source(src, tensor: str | None = None, keys=None) -> Source:
    """Inspect ``src`` (a path, or a 2-D float array with optional ``keys``) without reading its rows."""
    if isinstance(src, np.ndarray) or hasattr(src, "detach"):
        arr = np.ascontiguousarray(src.detach().cpu().float().numpy() if hasattr(src, "detach") else src)
        _check_2d(arr.shape, "array")
        if keys is None:
            return Source("array", "<array>", tensor, arr.shape[0], arr.shape[1], array=arr)
        return _keyed_array(arr, np.asarray(keys))
    if keys is not None:
        raise TableError("keys= goes with an in-memory array source; a file source brings its own keys")
    path = Path(src)
    if not path.exists():
        raise TableError(f"{path}: no such file or folder")
    if path.is_dir():
        return _folder_source(path, tensor)
    if path.suffix == ".npy":
        shape, _, _ = _npy_header(str(path))
        return Source("npy", str(path), None, shape[0], shape[1])
    if path.suffix == ".safetensors":
        return _safetensors_source(path, tensor)
    return _text_source(path)


def _keyed_array(arr: np.ndarray, keys: np.ndarray) -> Source:
    if keys.shape != (arr.shape[0],) or keys.dtype.kind not in "iu":
        raise TableError(f"keys must be {arr.shape[0]} integers (one per row), found {keys.dtype} {keys.shape}")
    keys = keys.astype(np.uint64 if keys.dtype.kind == "u" else np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    dup = sk[1:][sk[1:] == sk[:-1]]
    if dup.size:
        raise TableError(f"array source: duplicate key {int(dup[0])} ({dup.size} duplicates in all)")
    return Source("array", "<array>", None, arr.shape[0], arr.shape[1], keys=sk,
                  array=np.ascontiguousarray(arr[order]))


def _check_2d(shape, name: str) -> None:
    if len(shape) != 2 or shape[1] < 1:
        raise TableError(f"{name}: a table source is 2-D (rows, dim), found shape {tuple(shape)}")


def _check_float(dtype, name: str) -> None:
    if np.dtype(dtype).kind != "f":
        raise TableError(f"{name}: expected floating-point rows, found {dtype}")


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-order float .npy (the header is a literal, not a pickle)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy version {version} is not supported")
            shape, fortran, dtype = read[version](f)
        except ValueError as exc:
            raise TableError(f"{path}: not a readable .npy file ({exc})") from None
        offset = f.tell()
    _check_2d(shape, path)
    _check_float(dtype, path)
    if fortran:
        raise TableError(f"{path}: a Fortran-order array; save it C-order (np.ascontiguousarray)")
    return shape, dtype, offset


def _folder_source(path: Path, tensor: str | None) -> Source:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TableError(f"{path}: a model folder source needs a *.safetensors file; none found")
    if tensor is None:
        raise TableError(f"{path}: name the embedding tensor with --tensor (tensor=...)")
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), framework="np") as h:
            if tensor in h.keys():
                return _safetensors_source(f, tensor)
            if f"{tensor}.qdata" in h.keys():
                raise TableError(f"{f}: {tensor!r} is stored quantized; build the table from the float "
                                 "model (or its .safetensors) instead")
    raise TableError(f"{path}: no tensor {tensor!r} in {', '.join(f.name for f in files)}")


def _safetensors_source(path: Path, tensor: str | None) -> Source:
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as h:
        names = list(h.keys())
        if tensor is None:
            raise TableError(f"{path}: name the tensor with --tensor; it holds {names[:10]}")
        if tensor not in names:
            raise TableError(f"{path}: no tensor {tensor!r}; it holds {names[:10]}")
        sl = h.get_slice(tensor)
        shape, dtype = sl.get_shape(), sl.get_dtype()
    _check_2d(shape, f"{path}:{tensor}")
    if dtype not in ("F16", "BF16", "F32", "F64"):
        raise TableError(f"{path}:{tensor}: expected floating-point rows, found {dtype}")
    return Source("safetensors", str(path), tensor, shape[0], shape[1])


def read_rows(source: Source, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a dense source as float32 (stop - start, dim)."""
    if source.kind == "array":
        return source.array[start:stop].astype(np.float32, copy=False)
    if source.kind == "npy":  # plain reads, no mmap: a build's address space stays small
        shape, dtype, offset = _npy_header(source.path)
        with open(source.path, "rb") as f:
            f.seek(offset + start * shape[1] * dtype.itemsize)
            arr = np.fromfile(f, dtype=dtype, count=(stop - start) * shape[1])
        return arr.reshape(stop - start, shape[1]).astype(np.float32, copy=False)
    from safetensors import safe_open
    with safe_open(source.path, framework="pt") as h:
        return h.get_slice(source.tensor)[start:stop].float().numpy()


def _text_lines(path: str):
    with open(path, "r") as f:
        for no, line in enumerate(f, 1):
            if line.strip():
                yield no, line


def _text_source(path: Path) -> Source:
    """First pass: keys only (streamed), checked for form, one dim, and duplicates."""
    keys, dim = [], None
    for no, line in _text_lines(str(path)):
        key, tab, vals = line.partition("\t")
        try:
            keys.append(int(key))
        except ValueError:
            raise TableError(f"{path}:{no}: expected 'key<TAB>v1,v2,...', found {line[:60]!r}") from None
        d = vals.count(",") + 1
        if not tab or (dim is not None and d != dim):
            raise TableError(f"{path}:{no}: key {key} has {d if tab else 0} values, expected {dim or 'some'}")
        dim = d
    if not keys:
        raise TableError(f"{path}: no rows")
    lo, hi = min(keys), max(keys)
    if lo < 0 and hi > INT64_MAX or lo < -(1 << 63) or hi >= 1 << 64:
        raise TableError(f"{path}: keys span {lo}..{hi}: neither int64 nor uint64")
    arr = np.sort(np.array(keys, dtype=np.uint64 if hi > INT64_MAX else np.int64))
    dup = arr[1:][arr[1:] == arr[:-1]]
    if dup.size:
        raise TableError(f"{path}: duplicate key {int(dup[0])} ({dup.size} duplicates in all)")
    return Source("text", str(path), None, arr.size, dim, keys=arr)


def read_text_rows(source: Source, keys: np.ndarray):
    """Yield (positions into ``keys``, float32 rows) for the lines whose key is in sorted ``keys``."""
    lo, hi = int(keys[0]), int(keys[-1])
    got, vals = [], []
    for _, line in _text_lines(source.path):
        key, _, v = line.partition("\t")
        k = int(key)
        if lo <= k <= hi:
            got.append(k)
            vals.append(v.strip())
        if len(got) >= TEXT_CHUNK_LINES:
            yield _text_chunk(got, vals, keys, source)
            got, vals = [], []
    if got:
        yield _text_chunk(got, vals, keys, source)


def _text_chunk(got, vals, keys: np.ndarray, source: Source):
    rows = np.array(",".join(vals).split(","), dtype=np.float32).reshape(len(got), source.dim)
    return np.searchsorted(keys, np.array(got, dtype=keys.dtype)), rows


def rows_sha256(rows: np.ndarray, h: "hashlib._Hash") -> None:
    h.update(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
