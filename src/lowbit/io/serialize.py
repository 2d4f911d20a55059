"""`save` and `load`: quantized models to and from one safetensors file (see `io.format`)."""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..errors import FormatError, LowbitError
from ..nn import QuantizedModule
from ..primitives.packing import PACKING_VERSION
from .atomic import replace_folder, write_file
from .hfconfig import quantization_config_dict
from .format import FORMAT_VERSION, WEIGHTS_NAME, dedupe_tied, encode_header, file_sha256, tensors_sha256
from .reader import read_file, read_header, weights_path
from ..memory import release_freed_memory
from .restore import load_into, rebuild_model
from .skeleton import read_shards, shard_files
from .schema import check_side_name


def nonpersistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers outside the state dict (e.g. BERT's position_ids). Saved so that a skeleton built on
    the meta device can be completed."""
    state = model.state_dict(keep_vars=True)
    return {n: b for n, b in model.named_buffers() if n not in state}


def layer_table(model: torch.nn.Module) -> dict[str, dict]:
    """Header entries of the quantized modules, each once, with the other names it has."""
    table: dict[str, dict] = {}
    first: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, QuantizedModule):
            continue
        if id(m) in first:
            table[first[id(m)]]["aliases"].append(name)
        else:
            first[id(m)] = name
            table[name] = {**m.layer_meta(), "aliases": []}
    return table


def state_and_header(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors a lowbit file stores (tied ones once) and its header document (``files`` still
    empty: a folder save fills it in). `save` writes these; so does transformers' save_pretrained
    through `lowbit.hf`."""
    extra = nonpersistent_buffers(model)
    tensors, tied = dedupe_tied({**model.state_dict(), **extra})
    doc = {"format_version": FORMAT_VERSION, "packing_version": PACKING_VERSION,
           "layers": layer_table(model), "tied": tied, "nonpersistent": sorted(extra),
           "tensors_sha256": tensors_sha256(tensors), "files": {},
           "provenance": _provenance(model), "model": _model_info(model)}
    return tensors, doc


def save(model: torch.nn.Module, path: str | os.PathLike,
         side_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write ``model`` and return the weights file's path.

    ``path`` ending in ``.safetensors``: one file (a transformers model's config rides in its
    header). Otherwise a folder: ``model.safetensors``, ``config.json`` for a transformers model and
    ``side_files`` ({relative name: source path}, e.g. tokenizer files), every one checksummed in the
    header. The new artifact replaces an old one whole, or not at all.
    """
    if not isinstance(model, torch.nn.Module):
        raise LowbitError(f"model must be a torch.nn.Module, found {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise LowbitError(f"path must be a str or os.PathLike, found {type(path).__name__}")
    tensors, doc = state_and_header(model)
    p = Path(path)
    if p.suffix == ".safetensors":
        if side_files:
            raise LowbitError(f"{p}: side files need a folder artifact, not a single file")
        write_file(p, lambda tmp: save_file(tensors, str(tmp), metadata=encode_header(doc)))
        return p

    def build(tmp: Path) -> None:
        _write_side_files(model, tmp, side_files or {})
        doc["files"] = {f.relative_to(tmp).as_posix(): file_sha256(f)
                        for f in sorted(tmp.rglob("*")) if f.is_file()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=encode_header(doc))
    replace_folder(p, build, _replaceable)
    return p / WEIGHTS_NAME


def _write_side_files(model: torch.nn.Module, tmp: Path, side_files: Mapping) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        # config.json names lowbit as its quantization method, so transformers' from_pretrained
        # (after `import lowbit.hf`) reads this folder too
        d = json.loads(config.to_json_string(use_diff=False))
        d["quantization_config"] = quantization_config_dict(getattr(model, "lowbit_source", None))
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    for name, src in side_files.items():
        check_side_name(str(name), str(tmp))
        if str(name) == "config.json" and (tmp / "config.json").exists():
            continue  # the model's own config wins
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / name)


def _replaceable(folder: Path) -> bool:
    """True for an empty folder or one holding only a previous lowbit artifact's files."""
    present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
    if not present:
        return True
    if WEIGHTS_NAME not in present:
        return False
    try:
        doc = read_header(folder)
    except FormatError:
        return False
    listed = set(doc["files"]) | {WEIGHTS_NAME} | ({"config.json"} if doc["format_version"] == 1 else set())
    return present <= listed


def _model_info(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    return {"transformers_class": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False))}


def _provenance(model: torch.nn.Module) -> dict:
    source = dict(getattr(model, "lowbit_source", {}) or {})
    return {"lowbit_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), **source}


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a quantized model (one file, or a folder of shards with transformers' index, as
    ``save_pretrained(max_shard_size=...)`` writes them). ``model`` is the float architecture (its weights may be on the meta
    device); without it, a transformers model is rebuilt on the meta device from the config in the
    file's header and filled from the file (nothing is allocated before the shapes are checked)."""
    target = weights_path(path)
    shards = None if target.is_file() else shard_files(target.parent)
    doc, tensors = read_shards(shards) if shards else read_file(target)
    if model is None:
        model = rebuild_model(doc, target)
    elif not isinstance(model, torch.nn.Module):
        raise LowbitError(f"model must be a torch.nn.Module skeleton, found {type(model).__name__}")
    load_into(model, doc, tensors, str(target))
    del tensors  # the file's forms of the codes: each layer now holds its kept layout only
    release_freed_memory()
    model.lowbit_source = {k: v for k, v in doc["provenance"].items()
                           if k in ("scheme", "method", "methods", "source_sha256", "targets", "ignore",
                                    "method_options", "calibration", "sequential")}
    model.eval()
    return model


__all__ = ["load", "read_file", "read_header", "save", "weights_path"]
