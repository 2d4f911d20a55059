"""A float transformers checkpoint read one tensor at a time, and the model skeleton it fills.

`FloatCheckpoint` indexes a folder's ``model.safetensors`` or its shards
(``model.safetensors.index.json``, as ``save_pretrained(max_shard_size=...)`` writes them) and
reads tensors on demand with safetensors' ``safe_open``, one file open at a time, with its
``pread`` backend: each tensor is read into its own memory. (A memory-mapped shard is a private
mapping of the whole file: it counts against a process's data limit and address space while any
tensor of it lives, which is what a model larger than memory cannot afford.) `float_skeleton` builds the architecture with every parameter on the
meta device (no memory) and its buffers real (rotary frequencies, position ids: computed by the
constructor, they are not in checkpoints). `load_modules` / `release_modules` give a set of
modules their tensors from the checkpoint and take them back to the meta device.

Used by `lowbit.streaming` to quantize models larger than memory.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .errors import FormatError
from .io.format import WEIGHTS_NAME
from .io.skeleton import shard_files


class FloatCheckpoint:
    """key -> tensor over a float checkpoint folder; ``groups`` (key -> tie group, from the
    skeleton) lets a tied key missing from the files (e.g. ``lm_head.weight``) read its twin."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FormatError(f"{self.folder}: no config.json; a float checkpoint is a transformers "
                              "folder (config.json with model.safetensors or an index and shards)")
        self.files = shard_files(self.folder) or [self.folder / WEIGHTS_NAME]
        self.where: dict[str, Path] = {}
        for f in self.files:
            if not f.is_file():
                raise FormatError(f"{f}: missing (the checkpoint folder {self.folder} names it)")
            with self._open(f) as h:
                self.where.update(dict.fromkeys(h.keys(), f))
        self.groups: dict[str, int] = {}
        self.prefix = ""  # the model's base_model_prefix: a head-less model reads "<prefix>.<key>"
        self.nbytes = sum(f.stat().st_size for f in self.files)

    @staticmethod
    def _open(f: Path):
        try:
            return safe_open(str(f), framework="pt", backend="pread")
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{f}: not a readable safetensors file: {str(exc)[:200]}") from None

    def source_key(self, key: str) -> str:
        """The key (``key`` itself, with or without the base model prefix, or a tied twin) that
        the files hold (as transformers' from_pretrained finds it)."""
        p = f"{self.prefix}." if self.prefix else None
        for k in (key, p and p + key, p and key.startswith(p) and key[len(p):]):
            if k and k in self.where:
                return k
        group = self.groups.get(key)
        twins = sorted(k for k, g in self.groups.items() if g == group and k in self.where)
        if group is None or not twins:
            raise FormatError(f"{self.folder}: tensor {key!r} is not in the checkpoint "
                              f"({len(self.where)} tensors in {len(self.files)} file(s))")
        return twins[0]

    def holds(self, key: str) -> bool:
        try:
            return self.source_key(key) in self.where
        except FormatError:
            return False

    def read(self, wanted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{key: tensor} for the skeleton tensors ``wanted`` (meta), each cast to its dtype and
        checked against its shape; tied keys get one tensor object. Files are opened one at a time."""
        src = {k: self.source_key(k) for k in wanted}
        by_file: dict[Path, list[str]] = {}
        for s in sorted(set(src.values())):
            by_file.setdefault(self.where[s], []).append(s)
        raw: dict[str, torch.Tensor] = {}
        for f, keys in by_file.items():
            with self._open(f) as h:
                raw.update({s: h.get_tensor(s) for s in keys})
        out = {}
        for k, like in wanted.items():
            t = raw[src[k]]
            if tuple(t.shape) != tuple(like.shape):
                raise FormatError(f"{self.where[src[k]]}: tensor {src[k]!r} has shape {tuple(t.shape)}, "
                                  f"the model's {k!r} expects {tuple(like.shape)}")
            out[k] = raw.setdefault(f"{src[k]}|{like.dtype}", t.to(like.dtype))
        return out

    def lazy(self, skeleton: Mapping[str, torch.Tensor]) -> "LazyFloat":
        return LazyFloat(self, skeleton)


class LazyFloat(Mapping):
    """The float model's state dict, each tensor read when asked for (real skeleton buffers as
    they are): what `io.format.tensors_sha256` hashes for ``source_sha256``, one tensor at a time."""

    def __init__(self, ckpt: FloatCheckpoint, skeleton: Mapping[str, torch.Tensor]) -> None:
        self._ckpt, self._skeleton = ckpt, skeleton

    def __getitem__(self, key: str) -> torch.Tensor:
        like = self._skeleton[key]
        if not like.is_meta and not self._ckpt.holds(key):
            return like  # a persistent buffer the constructor made and the files do not hold
        return self._ckpt.read({key: like})[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._skeleton)

    def __len__(self) -> int:
        return len(self._skeleton)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device as it
    is registered (its buffers stay real). Restored on exit, also after an error."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def float_skeleton(folder: Path) -> torch.nn.Module:
    """The transformers architecture of ``folder`` (class: the config's first ``architectures``
    entry, else AutoModel, as `models.load_transformers` picks it) with parameters on meta."""
    from .models import OFFLINE_ENV
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    import transformers
    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with parameters_on_meta():
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls(config)
        else:
            model = transformers.AutoModel.from_config(config)
    return model.eval()


def tie_groups(model: torch.nn.Module, extra: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """state-dict key (and ``extra`` buffer key) -> group number; keys holding the same tensor
    object (tied weights) share a number."""
    state = {**model.state_dict(keep_vars=True), **extra}
    ids: dict[int, int] = {}
    return {k: ids.setdefault(id(t), len(ids)) for k, t in sorted(state.items())}


def direct_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own state-dict entries (not its children's)."""
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if "." not in k}


def module_state(module: torch.nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
    return module.state_dict(keep_vars=True) if recurse else direct_state(module)


def load_modules(model: torch.nn.Module, units: list[tuple[str, bool]], ckpt: FloatCheckpoint) -> None:
    """Give each ``(module name, recurse)`` its tensors from ``ckpt``: those on meta, and buffers
    the constructor made that the files hold too (the files win, as in from_pretrained)."""
    wanted = {}
    for name, recurse in units:
        prefix = f"{name}." if name else ""
        wanted.update({prefix + k: t for k, t in module_state(model.get_submodule(name), recurse).items()
                       if t.is_meta or ckpt.holds(prefix + k)})
    got = ckpt.read(wanted)
    for name, recurse in units:
        prefix = f"{name}." if name else ""
        local = {k[len(prefix):]: t for k, t in got.items() if k.startswith(prefix)
                 and (recurse or "." not in k[len(prefix):])}
        model.get_submodule(name).load_state_dict(local, strict=False, assign=True)


def release_modules(model: torch.nn.Module, units: list[tuple[str, bool]]) -> None:
    """Send each unit's state-dict tensors back to the meta device (freeing their memory)."""
    for name, recurse in units:
        module = model.get_submodule(name)
        if recurse:
            module.to("meta")
            continue
        meta = {k: torch.empty_like(t, device="meta") for k, t in direct_state(module).items()}
        module.load_state_dict(meta, strict=False, assign=True)
