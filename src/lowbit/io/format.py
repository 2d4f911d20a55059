"""lowbit's file format: one safetensors file, metadata in its JSON header, no pickle.

Key scheme (``FORMAT_VERSION`` 2): a quantized module ``name`` stores the tensors its weight kind
declares, listed in its header entry (``tensors``: for affine weights ``qdata`` (uint8 codes packed
per row as in `primitives.packing`), ``scale`` and, asymmetric only, ``zero_point``) under
``name.<tensor>``, plus its float parts (``name.bias``); every other entry of the model's state dict
is stored as is. The loader takes the list of quantized tensors from the header, never from a key's
suffix. Tensors that share storage (tied weights) are stored once; ``tied`` maps alias -> stored key.

The safetensors header's ``__metadata__`` holds one entry, ``lowbit``, a JSON document::

    {"format_version": 2, "packing_version": 1,
     "layers": {name: {"class": "QLinear", "kind": "affine", "spec": {...QuantSpec...},
                       "shape": [out, in], "input": null | {...ActSpec...}, "method": "rtn",
                       "sqnr_db": 31.2, "tensors": ["qdata", "scale", "zero_point"],
                       "dtype": "float32", "aliases": [other names of the same module]}},
     "tied": {alias_key: stored_key},
     "nonpersistent": [buffer names outside the state dict, stored so meta skeletons complete],
     "tensors_sha256": "<sha256 over every tensor's key, dtype, shape and bytes, in key order>",
     "files": {"config.json": "<sha256 of the side file beside the weights>", ...},
     "provenance": {"lowbit_version", "torch_version", "scheme", "method", "source_sha256", ...},
     "model": {"transformers_class": "BertModel", "config": {...}},     (transformers models only)
     "header_sha256": "<sha256 of this document without this key, canonical JSON>"}

``header_sha256`` covers the whole header, which covers the tensors (``tensors_sha256``) and every
side file (``files``): an edit anywhere in the artifact is detected. Format 1 files (no
``header_sha256``, ``files``, ``kind`` or ``tensors``; spec dicts with ``act_bits``) still load.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..errors import FormatError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "lowbit"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # a view: no copy
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
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


def _clean(v):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encode_header(doc: dict) -> dict[str, str]:
    """The safetensors metadata for ``doc``, sealed with ``header_sha256``."""
    doc = _clean({k: v for k, v in doc.items() if k != "header_sha256"})
    doc["header_sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
    return {METADATA_KEY: json.dumps(doc, sort_keys=True)}


def decode_header(metadata: dict[str, str] | None, path: str) -> dict:
    """Parse, version-check, integrity-check and schema-check a header; a v1 header is upgraded."""
    if not metadata or METADATA_KEY not in metadata:
        raise FormatError(f"{path}: no lowbit header; this safetensors file was not written by lowbit.save")
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: the lowbit header is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: the lowbit header must be a JSON object, found {type(doc).__name__}")
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: format_version {version!r} is not supported by this lowbit "
                          f"(reads versions {READABLE_VERSIONS})")
    if version >= 2:
        _check_seal(doc, path)
    from .schema import check_header, upgrade_v1
    if version == 1:
        doc = upgrade_v1(doc, path)
    check_header(doc, path)
    return doc


def _check_seal(doc: dict, path: str) -> None:
    seal = doc.get("header_sha256")
    body = {k: v for k, v in doc.items() if k != "header_sha256"}
    if not isinstance(seal, str) or hashlib.sha256(_canonical(body)).hexdigest() != seal:
        raise FormatError(f"{path}: the lowbit header does not match its header_sha256 "
                          "(the header was edited or damaged after it was written)")
