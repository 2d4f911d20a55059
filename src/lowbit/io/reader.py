"""Reading a lowbit file: header, tensors and side files, every integrity check before use."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FormatError
from .format import WEIGHTS_NAME, decode_header, file_sha256, tensors_sha256


def weights_path(path: str | os.PathLike) -> Path:
    """A folder means its model.safetensors; a file (or a *.safetensors name) means itself."""
    if not isinstance(path, (str, os.PathLike)):
        raise FormatError(f"path must be a str or os.PathLike, found {type(path).__name__}")
    p = Path(path)
    return p if p.suffix == ".safetensors" or p.is_file() else p / WEIGHTS_NAME


def read_header(path: str | os.PathLike) -> dict:
    """The verified header alone (no tensors read)."""
    target = weights_path(path)
    _exists(target)
    try:
        with safe_open(str(target), framework="pt") as f:
            return decode_header(f.metadata(), str(target))
    except (SafetensorError, OSError) as exc:
        raise _unreadable(target, exc) from None


def read_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header document and tensors of a lowbit file, every checksum verified. Never unpickles."""
    target = weights_path(path)
    _exists(target)
    try:
        with safe_open(str(target), framework="pt") as f:
            doc = decode_header(f.metadata(), str(target))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(target, exc) from None
    if tensors_sha256(tensors) != doc["tensors_sha256"]:
        raise FormatError(f"{target}: tensor data does not match the checksum in its header "
                          "(the file was edited or damaged after it was written)")
    for alias, key in doc["tied"].items():
        if key not in tensors:
            raise FormatError(f"{target}: tied entry {alias!r} points at missing tensor {key!r}")
        tensors[alias] = tensors[key]
    check_side_files(doc, target)
    return doc, tensors


def check_side_files(doc: dict, target: Path) -> None:
    """Every side file the header lists is beside the weights, byte for byte as saved."""
    for name, digest in sorted(doc["files"].items()):
        p = target.parent / name
        if not p.is_file():
            raise FormatError(f"{target}: side file {name!r} listed in the header is missing")
        if file_sha256(p) != digest:
            raise FormatError(f"{target}: side file {name!r} does not match the checksum in the "
                              "header (edited after it was saved?)")


def _exists(target: Path) -> None:
    if not target.is_file():
        raise FormatError(f"{target}: no such file")


def _unreadable(target: Path, exc: Exception) -> FormatError:
    return FormatError(f"{target}: not a readable safetensors file (truncated or edited?): {str(exc)[:200]}")
