"""Shape checks for a decoded lowbit header: every field a reader uses has the type it expects,
so a malformed file gets a `FormatError` naming the field, never a KeyError or TypeError."""
from __future__ import annotations

from ..errors import FormatError
from ..primitives.packing import PACKING_VERSION

_LAYER_FIELDS = {"class": str, "kind": str, "shape": list, "method": str,
                 "tensors": list, "dtype": str, "aliases": list}
# fields a weight kind adds to its layer entries (its `meta`)
_KIND_FIELDS = {"affine": {"spec": dict}, "codebook": {"format": str, "version": int, "block_size": int}}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_header(doc: dict, path: str) -> None:
    if doc.get("packing_version") != PACKING_VERSION:
        raise FormatError(f"{path}: packing_version {doc.get('packing_version')!r} is not supported "
                          f"(reads {PACKING_VERSION})")
    for key, kind in (("layers", dict), ("tied", dict), ("tensors_sha256", str),
                      ("nonpersistent", list), ("files", dict), ("provenance", dict), ("model", dict)):
        if not isinstance(doc.get(key), kind):
            raise FormatError(f"{path}: header field {key!r} must be a {kind.__name__}, "
                              f"found {type(doc.get(key)).__name__}")
    for name, entry in doc["layers"].items():
        _check_layer(name, entry, path)
    _check_strings(doc["tied"], "tied", path)
    _check_strings(doc["files"], "files", path)
    if not all(isinstance(n, str) for n in doc["nonpersistent"]):
        raise FormatError(f"{path}: header field 'nonpersistent' must list names")
    for name in doc["files"]:
        check_side_name(name, path)
    if doc["model"] and not isinstance(doc["model"].get("transformers_class"), str):
        raise FormatError(f"{path}: header field 'model' lacks a string 'transformers_class'")


def check_side_name(name: str, path: str) -> None:
    """A side file is a relative path inside the artifact's folder: no '..', no hidden parts."""
    parts = name.split("/")
    if not name or "\\" in name or any(p in ("", ".", "..") or p.startswith(".") for p in parts) \
            or name == "model.safetensors":
        raise FormatError(f"{path}: side file name {name!r} is not a plain relative path")


def _check_layer(name: str, entry: object, path: str) -> None:
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: layer {name!r}: entry must be an object, found {type(entry).__name__}")
    weight_kind = entry.get("kind")  # a name before it is looked up (a list is unhashable)
    if weight_kind is not None and not isinstance(weight_kind, str):
        raise FormatError(f"{path}: layer {name!r}: field 'kind' must be a str, "
                          f"found {type(weight_kind).__name__}")
    fields = {**_LAYER_FIELDS, **_KIND_FIELDS.get(weight_kind, {})}
    for key, kind in fields.items():
        if not isinstance(entry.get(key), kind) or (kind is int and isinstance(entry.get(key), bool)):
            raise FormatError(f"{path}: layer {name!r}: field {key!r} must be a {kind.__name__}, "
                              f"found {type(entry.get(key)).__name__}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry["shape"]):
        raise FormatError(f"{path}: layer {name!r}: shape must be positive integers, found {entry['shape']!r:.80}")
    if not all(isinstance(t, str) and t.isidentifier() for t in entry["tensors"]):
        raise FormatError(f"{path}: layer {name!r}: tensors must be names, found {entry['tensors']!r:.80}")
    if not all(isinstance(a, str) for a in entry["aliases"]):
        raise FormatError(f"{path}: layer {name!r}: aliases must be names")
    if entry["dtype"] not in FLOAT_DTYPES:
        raise FormatError(f"{path}: layer {name!r}: dtype must be one of {FLOAT_DTYPES}, found {entry['dtype']!r}")
    if entry.get("input") is not None and not isinstance(entry["input"], dict):
        raise FormatError(f"{path}: layer {name!r}: input must be an object or null")
    params = entry.get("input_params")
    if params is not None and not (isinstance(params, dict) and all(
            isinstance(params.get(k), (int, float)) and not isinstance(params.get(k), bool)
            for k in ("scale", "zero_point"))):
        raise FormatError(f"{path}: layer {name!r}: input_params must be null or numbers "
                          f"'scale' and 'zero_point', found {params!r:.80}")
    if not isinstance(entry.get("input_smooth", False), bool):
        raise FormatError(f"{path}: layer {name!r}: input_smooth must be true or false, found "
                          f"{entry['input_smooth']!r:.80}")
    db = entry.get("sqnr_db")
    if db is not None and not isinstance(db, (int, float, str)):
        raise FormatError(f"{path}: layer {name!r}: sqnr_db must be a number or null")


def _check_strings(d: dict, what: str, path: str) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise FormatError(f"{path}: header field {what!r} must map names to strings")


def upgrade_v1(doc: dict, path: str) -> dict:
    """A format 1 header in format 2's shape (same tensors; no header or side-file seal)."""
    if not isinstance(doc.get("layers"), dict):
        raise FormatError(f"{path}: header field 'layers' must be a dict, found {type(doc.get('layers')).__name__}")
    layers = {}
    for name, e in doc["layers"].items():
        if not isinstance(e, dict) or not isinstance(e.get("spec"), dict):
            raise FormatError(f"{path}: layer {name!r}: entry must be an object with a 'spec'")
        spec = e["spec"]  # QuantSpec.from_dict reads format 1's fields (act_*, float zero points)
        if spec.get("act_bits"):
            raise FormatError(f"{path}: layer {name!r}: format 1 cannot hold quantized inputs")
        tensors = ["qdata", "scale"] + ([] if spec.get("symmetric") else ["zero_point"])
        layers[name] = {**e, "spec": spec, "kind": "affine", "input": None, "tensors": tensors,
                        "dtype": "float32", "aliases": []}
    model = doc.get("model") or {}
    return {**doc, "layers": layers, "files": {}, "nonpersistent": doc.get("nonpersistent", []),
            "provenance": doc.get("provenance", {}), "model": model}
