"""lowbit's file format: one safetensors file, metadata in its JSON header, no pickle.

Key scheme (``FORMAT_VERSION`` 1): a quantized module ``name`` stores ``name.qdata`` (uint8, codes
packed per row as in `primitives.packing`), ``name.scale``, ``name.zero_point`` (asymmetric only)
and ``name.bias`` (if any); every other entry of the model's state dict is stored as is. Tensors
that share storage (tied weights) are stored once; ``tied`` maps each alias to the stored key.

The safetensors header's ``__metadata__`` holds one entry, ``lowbit``, a JSON document::

    {"format_version": 1, "packing_version": 1,
     "layers": {name: {"class": "QLinear", "spec": {...QuantSpec...}, "method": "rtn",
                       "shape": [out, in], "sqnr_db": 31.2}},
     "tied": {alias_key: stored_key},
     "nonpersistent": [buffer names outside the state dict, stored so meta skeletons complete],
     "tensors_sha256": "<sha256 over every tensor's key, dtype, shape and bytes, in key order>",
     "provenance": {"lowbit_version", "torch_version", "scheme", "method", "source_sha256", ...},
     "model": {"transformers_class": "BertModel"}}     (only for transformers models)
"""
from __future__ import annotations

import hashlib
import json
import math

import torch

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "lowbit"


class FormatError(ValueError):
    """A lowbit file that cannot be read as what it claims to be; the message names the file."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share storage once: returns (tensors to write, {alias: stored key})."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for key in sorted(state):
        t = state[key]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = t.detach().contiguous()
    return out, tied


def encode_header(doc: dict) -> dict[str, str]:
    def clean(v):  # JSON has no inf/nan: write them as strings
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return {METADATA_KEY: json.dumps(clean(doc), sort_keys=True)}


def decode_header(metadata: dict[str, str] | None, path: str) -> dict:
    if not metadata or METADATA_KEY not in metadata:
        raise FormatError(f"{path}: no lowbit header; this safetensors file was not written by lowbit.save")
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: the lowbit header is not valid JSON ({exc})") from None
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {version!r} is not supported by this lowbit "
                          f"(reads version {FORMAT_VERSION})")
    for key in ("layers", "tensors_sha256", "tied"):
        if key not in doc:
            raise FormatError(f"{path}: the lowbit header lacks {key!r}")
    return doc
