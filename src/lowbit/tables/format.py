"""The embedding-table file layout (``FORMAT_VERSION`` 1): a folder with ``manifest.json`` and shards.

A table maps keys (int64 or uint64: row ids or feature hashes) to rows of ``dim`` floats. Keys are
sorted across the whole table; shard ``i`` holds a contiguous run of them. When the keys are exactly
``0 .. rows-1`` (``dense_keys``) no key is stored: a key is its row id.

Shard file ``shard-00000.lbt`` (all integers little-endian)::

    offset  size  field
    0       4     magic b"LBTS"
    4       2     format version (u16) = 1
    6       1     bits (u8): 2, 4, 8 (quantized), 16 (raw float16), 32 (raw float32)
    7       1     flags (u8): bit 0 keys stored, bit 1 keys are uint64, bit 2 float32 scale/bias
    8       4     dim (u32)
    12      4     record_bytes (u32)
    16      8     rows (u64)
    24      8     first key (i64 or u64; a dense table: the shard's first row id)
    32      8*rows  keys, sorted ascending (only when flag bit 0)
    ...     record_bytes*rows  one record per row, in key order

A record of a quantized row (``p`` = 2 bytes for float16 parameters, 4 for float32)::

    | codes: packed_cols(dim, bits) bytes (primitives.packing) | scale (p bytes) | bias (p bytes) |

and the row is ``x_hat[j] = code[j] * scale + bias`` (scale-and-bias form, bias = the range's low
end; see `tables.quant`). With float16 parameters at 4 or 2 bits this is also FBGEMM's "fused
rowwise" layout (arXiv 1911.02079), so torch's quantized embedding-bag kernels read it as is.
A raw row (bits 16 or 32) is ``dim`` floats. A record is the unit every store keeps: a Redis value
is exactly one record. For dim 64 at 4 bits a record is 36 bytes.

``manifest.json``: {"format": "lowbit-table", "format_version", "packing_version", "dim", "bits",
"scale_dtype", "range_method", "key_dtype", "dense_keys", "rows", "record_bytes",
"shards": [{"file", "rows", "first_key", "last_key", "bytes", "sha256", "source_sha256"}],
"source": {...}, "source_sha256", "error": {...}, "created"}.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..primitives.packing import PACKING_VERSION, packed_cols
from ..errors import LowbitError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAGIC = b"LBTS"
HEADER = struct.Struct("<4sHBBIIQ8s")  # magic, version, bits, flags, dim, record_bytes, rows, first key
HEADER_BYTES = HEADER.size  # 32
FLAG_KEYS, FLAG_UINT64, FLAG_F32_PARAMS = 1, 2, 4
BITS = (2, 4, 8, 16, 32)
SCALE_DTYPES = ("float16", "float32")
KEY_DTYPES = ("int64", "uint64")


class TableError(LowbitError):
    """A table, source or store that cannot be used as asked; the message names the problem."""


@dataclass(frozen=True)
class Layout:
    """Row layout of a table: validated on construction."""

    dim: int
    bits: int
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise TableError(f"bits must be one of {BITS}, found {self.bits!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise TableError(f"dim must be a positive integer, found {self.dim!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise TableError(f"scale_dtype must be one of {SCALE_DTYPES}, found {self.scale_dtype!r}")

    @property
    def quantized(self) -> bool:
        return self.bits <= 8

    @property
    def param_bytes(self) -> int:
        """Bytes of one parameter (scale or bias); 0 for raw rows."""
        return (2 if self.scale_dtype == "float16" else 4) if self.quantized else 0

    @property
    def code_bytes(self) -> int:
        return packed_cols(self.dim, self.bits) if self.quantized else self.dim * self.bits // 8

    @property
    def record_bytes(self) -> int:
        return 2 * self.param_bytes + self.code_bytes


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.lbt"


def encode_header(layout: Layout, rows: int, first_key: int, keys_stored: bool, key_dtype: str) -> bytes:
    flags = (FLAG_KEYS if keys_stored else 0) | (FLAG_UINT64 if key_dtype == "uint64" else 0)
    flags |= FLAG_F32_PARAMS if layout.quantized and layout.scale_dtype == "float32" else 0
    key = struct.pack("<Q" if key_dtype == "uint64" else "<q", first_key)
    return HEADER.pack(MAGIC, FORMAT_VERSION, layout.bits, flags, layout.dim, layout.record_bytes,
                       rows, key)


def decode_header(raw: bytes, name: str) -> dict:
    """Header fields of a shard; raises TableError naming the shard when they cannot be read."""
    if len(raw) < HEADER_BYTES:
        raise TableError(f"{name}: truncated: {len(raw)} bytes, a shard header takes {HEADER_BYTES}")
    magic, version, bits, flags, dim, record_bytes, rows, key = HEADER.unpack(raw[:HEADER_BYTES])
    if magic != MAGIC:
        raise TableError(f"{name}: not a lowbit table shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise TableError(f"{name}: shard format version {version} is not supported (reads {FORMAT_VERSION})")
    key_dtype = "uint64" if flags & FLAG_UINT64 else "int64"
    first = struct.unpack("<Q" if key_dtype == "uint64" else "<q", key)[0]
    return {"bits": bits, "dim": dim, "record_bytes": record_bytes, "rows": rows, "first_key": first,
            "keys_stored": bool(flags & FLAG_KEYS), "key_dtype": key_dtype,
            "scale_dtype": "float32" if flags & FLAG_F32_PARAMS else "float16"}


def shard_bytes(layout: Layout, rows: int, keys_stored: bool) -> int:
    return HEADER_BYTES + rows * (8 * keys_stored + layout.record_bytes)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, doc: dict) -> None:
    """Temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise TableError(f"{folder}: no {MANIFEST_NAME}; not a lowbit table folder")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from None
    if doc.get("format") != "lowbit-table" or doc.get("format_version") != FORMAT_VERSION:
        raise TableError(f"{path}: format {doc.get('format')!r} version {doc.get('format_version')!r} "
                         f"is not supported (reads lowbit-table version {FORMAT_VERSION})")
    if doc.get("packing_version") != PACKING_VERSION:
        raise TableError(f"{path}: packing_version {doc.get('packing_version')!r}, this lowbit reads "
                         f"{PACKING_VERSION}")
    for key in ("dim", "bits", "scale_dtype", "key_dtype", "dense_keys", "rows", "record_bytes", "shards"):
        if key not in doc:
            raise TableError(f"{path}: the manifest lacks {key!r}")
    return doc


def layout_of(doc: dict) -> Layout:
    layout = Layout(doc["dim"], doc["bits"], doc["scale_dtype"] or "float16")
    if layout.record_bytes != doc["record_bytes"]:
        raise TableError(f"manifest: record_bytes {doc['record_bytes']} disagrees with dim {layout.dim} "
                         f"at {layout.bits} bits ({layout.record_bytes})")
    return layout
