"""`save` and `load`: quantized models to and from one safetensors file (see `io.format`)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..apply import apply
from ..nn import QUANTIZED_CLASSES, SWAP_TABLE, QuantizedModule
from ..primitives import QuantizedWeight
from ..primitives.affine import QuantizationError
from ..recipe import Plan, Rule
from ..spec import QuantSpec
from .format import (FORMAT_VERSION, WEIGHTS_NAME, FormatError, decode_header, dedupe_tied,
                     encode_header, tensors_sha256)
from ..primitives.packing import PACKING_VERSION


def weights_path(path: str | os.PathLike) -> Path:
    """A folder means its model.safetensors; a file (or a *.safetensors name) means itself."""
    p = Path(path)
    return p if p.suffix == ".safetensors" or p.is_file() else p / WEIGHTS_NAME


def nonpersistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers outside the state dict (e.g. BERT's position_ids), except quantized modules' kernel
    forms. Saved so that a skeleton built on the meta device can be completed."""
    skip = {n for n, m in model.named_modules() if isinstance(m, QuantizedModule)}
    state = model.state_dict(keep_vars=True)
    return {n: b for n, b in model.named_buffers()
            if n not in state and n.rpartition(".")[0] not in skip}


def layer_table(model: torch.nn.Module) -> dict[str, dict]:
    return {name: {"class": type(m).__name__, "spec": m.spec.to_dict(), "method": m.method,
                   "shape": list(m.weight_shape), "sqnr_db": m.sqnr_db}
            for name, m in model.named_modules() if isinstance(m, QuantizedModule)}


def save(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (a folder gets ``model.safetensors``; a transformers model also
    gets its config). The file is written under a temporary name and renamed when complete."""
    target = weights_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    extra = nonpersistent_buffers(model)
    tensors, tied = dedupe_tied({**model.state_dict(), **extra})
    doc = {"format_version": FORMAT_VERSION, "packing_version": PACKING_VERSION,
           "layers": layer_table(model), "tied": tied, "nonpersistent": sorted(extra),
           "tensors_sha256": tensors_sha256(tensors),
           "provenance": _provenance(model)}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        doc["model"] = {"transformers_class": type(model).__name__}
        config.save_pretrained(str(target.parent))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=encode_header(doc))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _provenance(model: torch.nn.Module) -> dict:
    from .. import __version__
    source = dict(getattr(model, "lowbit_source", {}) or {})
    return {"lowbit_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), **source}


def read_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header document and tensors of a lowbit file, checksum verified. Never unpickles."""
    target = weights_path(path)
    if not target.is_file():
        raise FormatError(f"{target}: no such file")
    try:
        with safe_open(str(target), framework="pt") as f:
            doc = decode_header(f.metadata(), str(target))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise FormatError(f"{target}: not a readable safetensors file (truncated or edited?): {exc}") from None
    if tensors_sha256(tensors) != doc["tensors_sha256"]:
        raise FormatError(f"{target}: tensor data does not match the checksum in its header "
                          "(the file was edited or damaged after it was written)")
    for alias, key in doc["tied"].items():
        if key not in tensors:
            raise FormatError(f"{target}: tied entry {alias!r} points at missing tensor {key!r}")
        tensors[alias] = tensors[key]
    return doc, tensors


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a quantized model. ``model`` is the float architecture (its weights may be on the meta
    device); without it, a transformers model is rebuilt from the config saved beside the file."""
    target = weights_path(path)
    doc, tensors = read_file(target)
    if model is None:
        model = _rebuild_transformers(doc, target)
    plan, weights, sqnr = _plan_from_header(doc, tensors, model, str(target))
    buffers = {k: tensors.pop(k) for k in doc.get("nonpersistent", []) if k in tensors}
    apply(model, plan, weights=weights, sqnr=sqnr)
    _restore_buffers(model, buffers, str(target))
    _load_rest(model, tensors, str(target))
    _retie(model, doc["tied"])
    model.lowbit_source = {k: v for k, v in doc.get("provenance", {}).items()
                           if k in ("scheme", "method", "source_sha256")}
    model.eval()
    return model


def _restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor], path: str) -> None:
    for name, value in buffers.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, attr, None)
        if current is None or tuple(current.shape) != tuple(value.shape):
            found = "nothing" if current is None else tuple(current.shape)
            raise FormatError(f"{path}: buffer {name!r}: the file holds shape {tuple(value.shape)}, "
                              f"the model has {found}")
        owner.register_buffer(attr, value, persistent=False)


def _retie(model: torch.nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very same Parameter/buffer object as its stored key again."""
    for alias, key in tied.items():
        owner_name, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = key.rpartition(".")
        src = getattr(model.get_submodule(src_owner), src_attr)
        setattr(model.get_submodule(owner_name), attr, src)


def _plan_from_header(doc: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module, path: str):
    layers, weights, sqnr = {}, {}, {}
    modules = dict(model.named_modules())
    for name, entry in doc["layers"].items():
        module = modules.get(name)
        qcls = QUANTIZED_CLASSES.get(entry["class"])
        if isinstance(module, QuantizedModule):
            raise FormatError(f"{path}: layer {name!r} of the model is already quantized; "
                              "load into the float architecture")
        if module is None or qcls is None or SWAP_TABLE.get(type(module)) is not qcls:
            found = "nothing" if module is None else type(module).__name__
            raise FormatError(f"{path}: layer {name!r} is a {entry['class']} in the file but the model "
                              f"has {found} there")
        spec = QuantSpec.from_dict(entry["spec"])
        shape = tuple(entry["shape"])
        if tuple(module.weight.shape) != shape:
            raise FormatError(f"{path}: layer {name!r}: the file holds a weight of shape {shape}, "
                              f"the model expects {tuple(module.weight.shape)}")
        qw = QuantizedWeight(tensors.pop(f"{name}.qdata", None), tensors.pop(f"{name}.scale", None),
                             tensors.pop(f"{name}.zero_point", None), spec, shape)
        try:
            qw.check(name)
        except QuantizationError as exc:
            raise FormatError(f"{path}: {exc}") from None
        layers[name] = Rule((name,), spec, method=entry["method"])
        weights[name] = qw
        db = entry.get("sqnr_db")
        sqnr[name] = float(db) if db is not None else None
    return Plan(layers), weights, sqnr


def _load_rest(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    quant_keys = {k for k in expected if k.rsplit(".", 1)[-1] in ("qdata", "scale", "zero_point")}
    for key in sorted(expected):
        if key in quant_keys:
            continue
        if key not in tensors:
            raise FormatError(f"{path}: tensor {key!r} is missing from the file")
        want, got = expected[key], tensors[key]
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            raise FormatError(f"{path}: tensor {key!r}: expected {tuple(want.shape)} {want.dtype}, "
                              f"found {tuple(got.shape)} {got.dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise FormatError(f"{path}: the file has tensors the model does not: {extra[:5]}")
    rest = {k: v for k, v in tensors.items() if k not in quant_keys}
    model.load_state_dict(rest, strict=False, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise FormatError(f"{path}: after loading, {meta[:3]} are still on the meta device "
                          "(non-persistent buffers are not saved; build the skeleton on the CPU)")


def _rebuild_transformers(doc: dict, target: Path) -> torch.nn.Module:
    cls_name = doc.get("model", {}).get("transformers_class")
    if not cls_name:
        raise FormatError(f"{target}: not a transformers model; pass model=<the float architecture>")
    try:
        import transformers
    except ImportError:
        raise FormatError(f"{target}: rebuilding {cls_name} needs transformers "
                          "(pip install 'lowbit[hf]')") from None
    cls = getattr(transformers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"{target}: {cls_name!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(str(target.parent))
    return cls(config)
