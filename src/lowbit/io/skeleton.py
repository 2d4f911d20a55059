"""Quantized skeletons for loaders that fill tensors in themselves (transformers' `from_pretrained`).

`build_skeleton` swaps every layer a file header lists for its quantized twin whose tensors are
on the meta device (shapes and dtypes as the header's weight kind and spec dictate: nothing is
allocated); the loader then assigns the file's tensors by key (``name.qdata``, ``name.scale``, ...).
`finish_loaded` checks what arrived (shapes, dtypes, values, nothing left on meta) and rebuilds
each layer's derived state, as `QuantizedModule._load_from_state_dict` does on the torch path.
`verify_files` checks the whole artifact (header seal, tensors over one or more shard files,
side files) without holding more than one tensor at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..apply import Report, apply
from ..errors import FormatError, QuantizationError
from ..nn import QuantizedModule
from ..primitives import QuantizedWeight
from ..primitives.affine import scale_dtype, zero_point_dtype
from ..primitives.packing import packed_cols
from ..recipe import Plan
from .format import decode_header, tensors_sha256
from .reader import check_side_files
from .schema import check_side_name
from .restore import checked_tensor_names, plan_from_header, smooth_placeholders


def meta_weight(kind: str, meta: dict, name: str) -> QuantizedWeight:
    """A weight of ``kind`` whose tensors are on the meta device, shaped as ``meta`` says."""
    if kind != QuantizedWeight.KIND:
        raise QuantizationError(f"{name}: no meta skeleton for weight kind {kind!r}")
    names = QuantizedWeight.tensor_names_for(meta, name)
    probe = QuantizedWeight(None, None, None, *_spec_shape(meta, name))
    spec, rows, cols = probe.spec, probe.rows, probe.cols
    groups = {"tensor": (1, 1), "group": (rows, cols // (spec.group_size or 1))}
    pshape = groups.get(spec.granularity, (rows, 1))
    qdata = torch.empty(rows, packed_cols(cols, spec.bits), dtype=torch.uint8, device="meta")
    scale = torch.empty(pshape, dtype=scale_dtype(spec), device="meta")
    zp = (torch.empty(pshape, dtype=zero_point_dtype(spec), device="meta")
          if "zero_point" in names else None)
    qw = QuantizedWeight(qdata, scale, zp, spec, probe.shape)
    qw.check(name)  # the kind's own shape rule agrees with this skeleton
    return qw


def _spec_shape(meta: dict, name: str):
    from ..primitives.qweight import _parse_meta
    return _parse_meta(meta, name)


def skeleton_plan(doc: dict, model: torch.nn.Module, path: str) -> tuple[Plan, dict, dict]:
    """(plan, meta weights, sqnr) for the layers ``doc`` lists, checked against ``model``."""
    def meta(entry: dict, name: str):
        kind_meta, names = checked_tensor_names(entry, name, path)
        try:
            return meta_weight(entry["kind"], kind_meta, name), names
        except QuantizationError as exc:
            raise FormatError(f"{path}: {exc}") from None
    the_plan, weights, sqnr, _, built = plan_from_header(doc, {}, model, path, make_weight=meta)
    return the_plan, weights, sqnr


def build_skeleton(model: torch.nn.Module, doc: dict, path: str) -> Report:
    """Swap the header's layers for quantized twins on the meta device (through `apply`)."""
    the_plan, weights, sqnr = skeleton_plan(doc, model, path)
    report = apply(model, the_plan, weights=weights, sqnr=sqnr, input_smooth=smooth_placeholders(doc))
    for name, entry in doc["layers"].items():
        model.get_submodule(name).compute_dtype = getattr(torch, entry["dtype"])
    return report


def finish_loaded(model: torch.nn.Module, path: str) -> list[str]:
    """After a loader assigned the tensors: every quantized layer's tensors are checked (shape,
    dtype, values) and its derived state rebuilt. Returns the layers' names."""
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedModule):
            continue
        on_meta = [t for t in m.tensor_names if m._buffers[t].is_meta]
        if on_meta or (getattr(m, "bias", None) is not None and m.bias.is_meta):
            raise FormatError(f"{path}: layer {name!r}: {on_meta or ['bias']} were not in the checkpoint")
        try:
            m.qweight.check(name)
            m.qweight.validate(name)
        except QuantizationError as exc:
            raise FormatError(f"{path}: {exc}") from None
        m.rebuild()
        names.append(name)
    return names


class _LazyTensors(Mapping):
    """{key: tensor} over one or more safetensors files, each tensor read when asked for."""

    def __init__(self, handles: list) -> None:
        self._where = {k: h for h in handles for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def verify_files(files: Sequence[str | Path]) -> dict:
    """The verified header of a lowbit checkpoint in one file or several shards (each shard
    carries the same header; ``tensors_sha256`` covers the union of their tensors)."""
    files = [Path(f) for f in files]
    handles = []
    try:
        for f in files:
            handles.append(safe_open(str(f), framework="pt"))
        docs = [decode_header(h.metadata(), str(f)) for h, f in zip(handles, files)]
        if any(d.get("header_sha256") != docs[0].get("header_sha256") for d in docs[1:]):
            raise FormatError(f"{files[0].parent}: the shards carry different lowbit headers")
        if tensors_sha256(_LazyTensors(handles)) != docs[0]["tensors_sha256"]:
            raise FormatError(f"{files[0]}: tensor data does not match the checksum in its header "
                              "(the files were edited or damaged after they were written)")
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{files[0]}: not a readable safetensors file: {str(exc)[:200]}") from None
    check_side_files(docs[0], files[0])
    return docs[0]


INDEX_NAME = "model.safetensors.index.json"


def shard_files(folder: Path) -> list[Path] | None:
    """The shard files a folder's ``model.safetensors.index.json`` names (transformers' sharded
    layout, as save_pretrained writes it), or None when there is no index."""
    index = Path(folder) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FormatError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
    for name in names:
        check_side_name(str(name), str(index))
    return [Path(folder) / n for n in names]


def read_shards(files: Sequence[Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a sharded lowbit checkpoint, verified as `verify_files` does."""
    doc = verify_files(files)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    for alias, key in doc["tied"].items():
        if key not in tensors:
            raise FormatError(f"{files[0]}: tied entry {alias!r} points at missing tensor {key!r}")
        tensors[alias] = tensors[key]
    return doc, tensors
