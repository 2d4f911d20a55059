"""Putting a file's contents into a model: plan from the header, quantized layers swapped in by
`apply`, float tensors assigned, buffers restored, tied weights re-tied."""
from __future__ import annotations

from pathlib import Path

import torch

from ..apply import apply, swap_modules
from ..errors import FormatError, LowbitError, QuantizationError
from ..nn import QuantizedModule, class_by_name, quantized_class
from ..primitives import WEIGHT_KINDS
from ..recipe import Plan, Rule
from ..spec import ActSpec


def load_into(model: torch.nn.Module, doc: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    plan, weights, sqnr, quant_keys, built = plan_from_header(doc, tensors, model, path)
    buffers = {k: tensors.pop(k) for k in doc["nonpersistent"] if k in tensors}
    params = {n: e.get("input_params") for n, e in doc["layers"].items() if e.get("input_params")}
    smooth = smooth_placeholders(doc)
    try:
        if plan.layers:
            apply(model, plan, weights=weights, sqnr=sqnr, input_params=params, input_smooth=smooth)
    except QuantizationError as exc:
        raise FormatError(f"{path}: {exc}") from None
    swap_modules(model, built)
    for name, entry in doc["layers"].items():
        model.get_submodule(name).compute_dtype = getattr(torch, entry["dtype"])
    _restore_buffers(model, buffers, path)
    _load_rest(model, {k: v for k, v in tensors.items() if k not in quant_keys}, quant_keys, path)
    _retie(model, doc["tied"], path)


def smooth_placeholders(doc: dict) -> dict[str, torch.Tensor]:
    """Layers smoothed at run time (``"input_smooth": true``): factors of 1 that the file's
    ``<layer>.smooth`` tensor replaces when the float tensors load."""
    return {n: torch.ones(e["shape"][1]) for n, e in doc["layers"].items() if e.get("input_smooth")}


def plan_from_header(doc: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module, path: str,
                     make_weight=None):
    """Affine layers as a Plan with their weights (for `apply`); codebook layers as built modules
    (for `swap_modules`); the file keys that belong to quantized layers. The one place a header's
    layers meet a model: ``make_weight(entry, name) -> (weight, tensor names)`` builds each weight
    (default: from ``tensors``; the transformers loader passes meta-device skeletons)."""
    make = make_weight or (lambda entry, name: _weight_from_file(entry, name, tensors, path))
    layers, weights, sqnr, aliases, quant_keys, built = {}, {}, {}, {}, set(), {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, entry in doc["layers"].items():
        module = modules.get(name)
        input_spec = _input_spec(entry, name, path)
        mode = None if input_spec is None else ("static" if input_spec.static else "dynamic")
        _check_module(module, entry, name, mode, path)
        qw, names = make(entry, name)
        if tuple(module.weight.shape) != tuple(qw.shape):
            raise FormatError(f"{path}: layer {name!r}: the file holds a weight of shape {tuple(qw.shape)}, "
                              f"the model expects {tuple(module.weight.shape)}")
        if entry["kind"] == "affine":
            layers[name] = Rule((name,), qw.spec, method=entry["method"], input_spec=input_spec)
            weights[name], sqnr[name] = qw, _db(entry.get("sqnr_db"))
            aliases.update({a: name for a in entry["aliases"]})
        else:
            cls = quantized_class(module, entry["kind"], mode)
            built[name] = cls.from_float(module, qw, entry["method"], _db(entry.get("sqnr_db")), None)
            built.update({a: built[name] for a in entry["aliases"] if a in modules})
        for other in [name] + entry["aliases"]:
            quant_keys |= {f"{other}.{t}" for t in names}
    return Plan(layers, {}, aliases), weights, sqnr, quant_keys, built


def _weight_from_file(entry: dict, name: str, tensors: dict[str, torch.Tensor], path: str):
    """The layer's weight, built by its kind from the tensors the header lists."""
    kind = WEIGHT_KINDS[entry["kind"]]
    meta, names = checked_tensor_names(entry, name, path)
    try:
        return kind.from_tensors({t: tensors.get(f"{name}.{t}") for t in names}, meta, name), names
    except LowbitError as exc:
        raise FormatError(f"{path}: {exc}") from None


def checked_tensor_names(entry: dict, name: str, path: str) -> tuple[dict, tuple[str, ...]]:
    """(the kind's meta, its tensor names), checked against the header's tensor list."""
    kind = WEIGHT_KINDS[entry["kind"]]
    try:
        meta = {k: entry[k] for k in kind.META_KEYS}
        names = kind.tensor_names_for(meta, name)
    except LowbitError as exc:
        raise FormatError(f"{path}: {exc}") from None
    if list(names) != entry["tensors"]:
        raise FormatError(f"{path}: {name}: the header lists tensors {entry['tensors']}, a "
                          f"{entry['kind']} weight of this kind has {list(names)}")
    return meta, names


def _input_spec(entry: dict, name: str, path: str) -> ActSpec | None:
    if entry.get("input") is None:
        return None
    try:
        return ActSpec.from_dict(entry["input"])
    except LowbitError as exc:
        raise FormatError(f"{path}: layer {name!r}: {exc}") from None


def _check_module(module, entry: dict, name: str, mode: str | None, path: str) -> None:
    if isinstance(module, QuantizedModule):
        raise FormatError(f"{path}: layer {name!r} of the model is already quantized; "
                          "load into the float architecture")
    if entry["kind"] not in WEIGHT_KINDS:
        raise FormatError(f"{path}: layer {name!r}: unknown weight kind {entry['kind']!r}; "
                          f"known: {sorted(WEIGHT_KINDS)}")
    qcls = class_by_name(entry["class"])
    if module is None or qcls is None or quantized_class(module, entry["kind"], mode) is not qcls:
        found = "nothing" if module is None else type(module).__name__
        raise FormatError(f"{path}: layer {name!r} is a {entry['class']} in the file but the model "
                          f"has {found} there")


def _db(value) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor], path: str) -> None:
    for name, value in buffers.items():
        owner_name, _, attr = name.rpartition(".")
        owner = _submodule(model, owner_name, name, path)
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or tuple(current.shape) != tuple(value.shape):
            found = tuple(current.shape) if isinstance(current, torch.Tensor) else "nothing"
            raise FormatError(f"{path}: buffer {name!r}: the file holds shape {tuple(value.shape)}, "
                              f"the model has {found}")
        owner.register_buffer(attr, value, persistent=False)


def _submodule(model: torch.nn.Module, owner: str, key: str, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(owner) if owner else model
    except AttributeError:
        raise FormatError(f"{path}: {key!r} names a module the model does not have") from None


def _load_rest(model: torch.nn.Module, rest: dict[str, torch.Tensor], quant_keys: set[str], path: str) -> None:
    """Float tensors: every one the model has must be in the file, with its shape; a float dtype
    may differ (the file's wins: a bf16-cast model loads as bf16)."""
    expected = {k: v for k, v in model.state_dict().items() if k not in quant_keys}
    for key in sorted(expected):
        if key not in rest:
            raise FormatError(f"{path}: tensor {key!r} is missing from the file")
        want, got = expected[key], rest[key]
        same_kind = want.dtype == got.dtype or (want.is_floating_point() and got.is_floating_point())
        if tuple(want.shape) != tuple(got.shape) or not same_kind:
            raise FormatError(f"{path}: tensor {key!r}: expected {tuple(want.shape)} {want.dtype}, "
                              f"found {tuple(got.shape)} {got.dtype}")
    extra = sorted(set(rest) - set(expected))
    if extra:
        raise FormatError(f"{path}: the file has tensors the model does not: {extra[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise FormatError(f"{path}: after loading, {meta[:3]} are still on the meta device "
                          "(build the skeleton on the CPU)")


def _retie(model: torch.nn.Module, tied: dict[str, str], path: str) -> None:
    """Make each alias the very same Parameter/buffer object as its stored key again."""
    for alias, key in tied.items():
        owner_name, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = key.rpartition(".")
        src = getattr(_submodule(model, src_owner, key, path), src_attr, None)
        owner = _submodule(model, owner_name, alias, path)
        if src is None or not hasattr(owner, attr):
            raise FormatError(f"{path}: tied entry {alias!r} -> {key!r} does not fit the model")
        if getattr(owner, attr) is not src:
            setattr(owner, attr, src)


def rebuild_model(doc: dict, target: Path) -> torch.nn.Module:
    """The transformers architecture named in the header, built on the meta device (no memory)."""
    info = doc["model"]
    cls_name = info.get("transformers_class")
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
    try:
        config = (cls.config_class.from_dict(info["config"]) if isinstance(info.get("config"), dict)
                  else transformers.AutoConfig.from_pretrained(str(target.parent)))
        with torch.device("meta"):
            return cls(config)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RuntimeError) as exc:
        raise FormatError(f"{target}: cannot build {cls_name} from the saved config: {str(exc)[:200]}") from None
