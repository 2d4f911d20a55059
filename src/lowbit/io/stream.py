"""Writing a safetensors file whose tensors arrive one block at a time (`lowbit.streaming`).

`TensorSpool` appends each tensor's raw bytes to a scratch file as it is produced and keeps only
(dtype, shape, offset, length); the tensors themselves are freed by the caller. `write_safetensors`
then writes the final file exactly as ``safetensors.torch.save_file`` would (same bytes, checked by
a test against it), copying each tensor from the scratch file in pieces of ``COPY_CHUNK`` bytes.

No new layout: the file is plain safetensors (format 0.x, as written by safetensors 0.8)::

    offset 0        8                      8+N                                         end
           +--------+----------------------+-------------------------------------------+
           | N: u64 | JSON header, N bytes | tensor bytes, little-endian, no gaps      |
           |  (LE)  | padded with b" " to  | in layout order: dtype rank descending    |
           |        | a multiple of 8      | (I64, F64, F32, I32, BF16, F16, I16, I8,  |
           |        |                      | U8, BOOL), then key ascending             |
           +--------+----------------------+-------------------------------------------+

    JSON header (compact, in this key order):
      {"__metadata__":{"lowbit":"<lowbit's header document, see io.format>"},
       "<key>":{"dtype":"F32","shape":[r,c],"data_offsets":[begin,end]}, ...   (layout order)}

Offsets count from the first tensor byte. lowbit's own header (``FORMAT_VERSION`` 2) rides in
``__metadata__`` unchanged, so a streamed artifact loads through `lowbit.load` like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import FormatError

COPY_CHUNK = 8 << 20  # bytes per read when copying a tensor from the scratch file
# safetensors' dtype names, highest layout rank first (its Rust Dtype enum order, descending)
DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
          torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
_RANK = {name: i for i, name in enumerate(DTYPES.values())}  # layout order: ascending


@dataclass(frozen=True)
class Spooled:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the scratch file
    nbytes: int


class TensorSpool(Mapping):
    """{key: tensor} kept in a scratch file: `add` appends; indexing reads one tensor back."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = open(self.path, "w+b")
        self.entries: dict[str, Spooled] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.entries:
            raise FormatError(f"{self.path}: tensor {key!r} was written twice")
        if tensor.dtype not in DTYPES:
            raise FormatError(f"tensor {key!r}: dtype {tensor.dtype} cannot be streamed; "
                              f"supported: {[str(d) for d in DTYPES]}")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) a view, no copy
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(raw.data)
        self.entries[key] = Spooled(t.dtype, tuple(t.shape), offset, raw.nbytes)

    def read_bytes(self, key: str) -> Iterator[bytes]:
        e = self.entries[key]
        self._file.flush()
        done = 0
        while done < e.nbytes:
            n = min(COPY_CHUNK, e.nbytes - done)
            chunk = os.pread(self._file.fileno(), n, e.offset + done)
            if len(chunk) != n:
                raise FormatError(f"{self.path}: scratch file ended inside tensor {key!r}")
            done += n
            yield chunk

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)  # (nbytes,) read straight into the tensor
        self._file.flush()
        if e.nbytes and os.preadv(self._file.fileno(), [buf.numpy()], e.offset) != e.nbytes:
            raise FormatError(f"{self.path}: scratch file ended inside tensor {key!r}")
        return buf.view(e.dtype).reshape(e.shape)

    def sha256(self, names: Mapping[str, str]) -> str:
        """`io.format.tensors_sha256` of {key: spooled tensor ``names[key]``}, the same digest
        computed from the scratch file in ``COPY_CHUNK`` pieces (no tensor is held whole)."""
        h = hashlib.sha256()
        for key in sorted(names):
            e = self.entries[names[key]]
            h.update(f"{key}|{e.dtype}|{e.shape}|".encode())
            for chunk in self.read_bytes(names[key]):
                h.update(chunk)
        return h.hexdigest()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        self._file.close()


def header_bytes(entries: Mapping[str, Spooled], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The length prefix plus padded JSON header for ``entries``, and the keys in layout order."""
    order = sorted(entries, key=lambda k: (_RANK[DTYPES[entries[k].dtype]], k))
    doc: dict = {"__metadata__": metadata}
    begin = 0
    for k in order:
        e = entries[k]
        doc[k] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [begin, begin + e.nbytes]}
        begin += e.nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(path: str | os.PathLike, spool: TensorSpool, names: Mapping[str, str],
                      metadata: dict[str, str]) -> None:
    """Write one safetensors file holding, under each key of ``names``, the spooled tensor it
    names (several keys may name one entry), as ``save_file`` would write them."""
    head, order = header_bytes({k: spool.entries[e] for k, e in names.items()}, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for k in order:
            for chunk in spool.read_bytes(names[k]):
                f.write(chunk)


def stored_and_tied(keys: dict[str, str], spool: TensorSpool) -> tuple[dict[str, str], dict[str, str]]:
    """Which keys are stored and which are tied to a stored one, chosen as `format.dedupe_tied`
    chooses: the first key in sorted order holding a tensor is stored (empty tensors never tie)."""
    stored, tied, first = {}, {}, {}
    for key in sorted(keys):
        entry = keys[key]
        if spool.entries[entry].nbytes and entry in first:
            tied[key] = first[entry]
            continue
        first.setdefault(entry, key)
        stored[key] = entry
    return stored, tied


def save_streamed(model: torch.nn.Module, out: Path, spool: TensorSpool, keys: dict[str, str],
                  nonpersistent: list[str], side_files: Mapping | None = None) -> Path:
    """Write the lowbit folder ``out`` for ``model`` (its quantized modules may be on the meta
    device) whose tensors are in ``spool`` (``keys``: state-dict key -> spool entry): the same
    header and bytes `serialize.save` writes for the model in memory."""
    from ..primitives.packing import PACKING_VERSION
    from .atomic import replace_folder
    from .format import FORMAT_VERSION, WEIGHTS_NAME, encode_header, file_sha256
    from .serialize import _model_info, _provenance, _replaceable, _write_side_files, layer_table
    stored, tied = stored_and_tied(keys, spool)
    doc = {"format_version": FORMAT_VERSION, "packing_version": PACKING_VERSION,
           "layers": layer_table(model), "tied": tied, "nonpersistent": sorted(nonpersistent),
           "tensors_sha256": spool.sha256(stored), "files": {},
           "provenance": _provenance(model), "model": _model_info(model)}

    def build(tmp: Path) -> None:
        _write_side_files(model, tmp, side_files or {})
        doc["files"] = {f.relative_to(tmp).as_posix(): file_sha256(f)
                        for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_safetensors(tmp / WEIGHTS_NAME, spool, stored, encode_header(doc))
    replace_folder(out, build, _replaceable)
    return out / WEIGHTS_NAME
