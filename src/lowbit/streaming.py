"""Quantizing a checkpoint larger than memory, block by block from its safetensors shards.

`quantize_checkpoint` never holds the float model. The architecture is built with its parameters
on the meta device (`checkpoint.float_skeleton`); then each unit (a repeated block found as
`sequential.find_blocks` finds it, or one layer outside the blocks: embeddings, final norm, head)
is loaded from the shards, quantized, its tensors appended to a scratch file
(`io.stream.TensorSpool`), and sent back to the meta device::

    shards --read unit--> float unit --quantize (apply)--> quantized unit --append--> scratch file
                                                                 |--> meta (freed)
    scratch file --header + copy in layout order--> out/model.safetensors (tmp folder, fsync, rename)

GPTQ (Frantar et al., arXiv 2210.17323) runs as `sequential.quantize_sequential` does: the layers
outside the blocks are loaded (they must need no calibration: RTN, or ignored), quantized, the
inputs of block 0 are captured, and each block is loaded, calibrated on the activations the
quantized blocks before it produced, quantized, written, run to make the next block's inputs and
freed. Peak memory: the largest unit (one block, or the outside layers together for GPTQ's
capture) plus the activations of every calibration sample at one block boundary, plus the
largest single tensor when hashing.

The artifact is byte for byte the one ``lowbit.quantize(model, ...)`` + ``lowbit.save(model, out)``
writes for the loaded model (GPTQ: with ``sequential=True``), so it loads with `lowbit.load`.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from . import provenance
from .api import calibration_needs, make_recipe, source_entries, with_embeddings
from .apply import Report, apply
from .calibrate import capture_inputs, collect
from .checkpoint import (FloatCheckpoint, float_skeleton, load_modules, module_state, release_modules,
                         tie_groups)
from .errors import FormatError, RecipeError
from .io.format import tensors_sha256
from .io.serialize import _replaceable, nonpersistent_buffers
from .io.stream import TensorSpool, save_streamed
from .memory import release_freed_memory
from .nn import QuantizedModule
from .recipe import Plan, Recipe
from .recipe import plan as plan_recipe
from .sequential import _BlockCall, _kinds, find_blocks, run_block, without_caches
from .spec import QuantSpec, Scheme

Unit = list  # [(module name, recurse into children)]


def quantize_checkpoint(src: str | os.PathLike, scheme: "str | QuantSpec | Scheme | Recipe",
                        out: str | os.PathLike, *, method: str = "rtn", data: Iterable | None = None,
                        targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
                        embeddings: str | None = None, method_options: dict | None = None,
                        side_files: Mapping[str, str | os.PathLike] | None = None,
                        allow_empty: bool = False, progress: bool = True, verbose: bool = True) -> Path:
    """Quantize the transformers checkpoint folder ``src`` into the lowbit folder ``out`` without
    loading it whole (see the module docstring); returns the weights file's path.

    Arguments as `lowbit.quantize` takes them; ``embeddings`` (a scheme) also quantizes Embedding
    layers, as ``lowbit quantize --embeddings`` does; ``side_files`` as `lowbit.save` takes them.
    ``verbose`` prints the report (layers, bytes) as `quantize` does. Not supported here:
    ``smooth`` and ``observer`` (they need the whole model), and calibrated layers outside the
    repeated blocks (a `RecipeError` names them). The speed guardrail does not run.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or not _replaceable(out)):  # now, not after the work
        raise FormatError(f"{out}: exists and is not a lowbit folder or empty; refusing to replace it")
    ckpt = FloatCheckpoint(src)
    model = float_skeleton(ckpt.folder)
    requested = method
    scheme, targets, ignore, method, method_options = with_embeddings(
        scheme, targets, ignore, embeddings, method, method_options)
    recipe = make_recipe(scheme, targets, ignore, method, method_options)
    the_plan = plan_recipe(model, recipe, allow_empty=allow_empty)
    data = provenance.as_batches(data)
    extra = nonpersistent_buffers(model)
    ckpt.groups = tie_groups(model, extra)
    ckpt.prefix = getattr(model, "base_model_prefix", "") or ""
    sha = tensors_sha256(ckpt.lazy(model.state_dict(keep_vars=True)))
    source = source_entries(scheme, recipe, provenance.main_method(the_plan, requested), targets,
                            ignore, sha)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lowbit-stream-", dir=out.parent) as tmp:
        run = _Stream(model, the_plan, ckpt, TensorSpool(Path(tmp) / "tensors.bin"), progress)
        try:
            run.write_buffers(extra)
            run.run(data, calibration_needs(the_plan))
            model.lowbit_source = {**source, **provenance.method_provenance(the_plan, data, True)}
            model.lowbit_report = run.report
            if verbose:
                print(run.report, file=sys.stderr)
            return save_streamed(model, out, run.spool, run.keys, sorted(extra), side_files)
        finally:
            run.spool.close()


class _Stream:
    """One streaming run: which units exist, and load / quantize / write / release for each."""

    def __init__(self, model: torch.nn.Module, the_plan: Plan, ckpt: FloatCheckpoint,
                 spool: TensorSpool, progress: bool) -> None:
        self.model, self.plan, self.ckpt, self.spool, self.progress = model, the_plan, ckpt, spool, progress
        self.report = Report(skipped=dict(the_plan.skipped), aliases=dict(the_plan.aliases))
        self.keys: dict[str, str] = {}  # final state-dict key -> spool entry
        by_id: dict[int, list[str]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            by_id.setdefault(id(m), []).append(n)
        # module name -> every name of that module (listed before any module is swapped)
        self.names = {n: by_id[id(m)] for n, m in model.named_modules(remove_duplicate=False)}
        try:
            self.list_name, self.count = find_blocks(model, the_plan.layers)
        except RecipeError:
            self.list_name, self.count = None, 0  # no repeated blocks: every layer is its own unit

    def inside(self, name: str) -> bool:
        return self.list_name is not None and (name == self.list_name or name.startswith(self.list_name + "."))

    def outside_units(self) -> list[Unit]:
        return [[(n, False)] for n, m in self.model.named_modules()
                if not self.inside(n) and module_state(m, False)]

    def block_unit(self, i: int) -> Unit:
        return [(f"{self.list_name}.{i}", True)]

    def planned(self, unit: Unit) -> list[str]:
        return [n for n in self.plan.layers for u, rec in unit if n == u or (rec and n.startswith(u + "."))]

    def run(self, data, needs: dict) -> None:
        if needs:
            return self.run_calibrated(data, needs)
        units = self.outside_units() + [self.block_unit(i) for i in range(self.count)]
        for unit in self.bar(units, "stream units"):
            load_modules(self.model, unit, self.ckpt)
            self.quantize(self.planned(unit), None)
            self.write(unit)
            release_modules(self.model, unit)
            release_freed_memory()

    def run_calibrated(self, data, needs: dict) -> None:
        if data is None or isinstance(data, (torch.Tensor, dict)) or not data:
            raise RecipeError("streaming calibration: data must be a non-empty list of batches "
                              f"(pass data=...), found {type(data).__name__}")
        if self.list_name is None:
            raise RecipeError("streaming calibration needs a model made of repeated blocks")
        outside = [u for units in self.outside_units() for u in units]
        bad = sorted(n for n in self.planned(outside) if n in needs)
        if bad:
            raise RecipeError(f"streaming: layers outside the repeated blocks cannot be calibrated "
                              f"from shards: {bad[:5]}; ignore them or quantize them with rtn (a Recipe)")
        load_modules(self.model, outside, self.ckpt)
        self.quantize(self.planned(outside), None)
        inputs = [without_caches(c) for c in capture_inputs(self.model, data, f"{self.list_name}.0",
                                                             progress=self.progress)]
        self.write(outside)
        release_modules(self.model, outside)
        stats_kinds = _kinds(self.plan, needs)
        for i in self.bar(range(self.count), "stream blocks"):
            unit = self.block_unit(i)
            load_modules(self.model, unit, self.ckpt)
            names = self.planned(unit)
            self.quantize(names, self.block_stats(i, names, inputs, stats_kinds))
            self.write(unit)
            if i + 1 < self.count:
                inputs = run_block(self.model.get_submodule(unit[0][0]), inputs)
            release_modules(self.model, unit)
            release_freed_memory()

    def block_stats(self, i: int, names: list[str], inputs: list, stats_kinds) -> dict:
        """Block ``i``'s statistics from its captured inputs (as `quantize_sequential` gets them)."""
        kinds, observers = stats_kinds(names)
        if not kinds:
            return {}
        prefix = f"{self.list_name}.{i}."
        local = [f"block.{n[len(prefix):]}" for n in names]
        observers = {f"block.{n[len(prefix):]}": o for n, o in observers.items()}
        got = collect(_BlockCall(self.model.get_submodule(prefix[:-1])), [(c,) for c in inputs], local,
                      stats=kinds, observer=observers, progress=False)
        return {n: got[loc] for n, loc in zip(names, local)}

    def quantize(self, names: list[str], stats: dict | None) -> None:
        if not names:
            return
        sub = Plan({n: self.plan.layers[n] for n in names}, {},
                   {a: n for a, n in self.plan.aliases.items() if n in names})
        r = apply(self.model, sub, stats=stats)
        self.report.layers += r.layers
        self.report.warnings += r.warnings

    def write(self, unit: Unit) -> None:
        """Append the unit's tensors (under every name its modules have) to the spool; tensors
        shared by several keys (tied weights, aliased modules) are written once."""
        for name, recurse in unit:
            for alias in self.names[name]:
                prefix = f"{alias}." if alias else ""
                for k, t in module_state(self.model.get_submodule(alias), recurse).items():
                    self.add(prefix + k, t)

    def add(self, key: str, t: torch.Tensor) -> None:
        owner_name, _, attr = key.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        token = (f"q{id(owner)}.{attr}" if isinstance(owner, QuantizedModule)
                 else f"f{self.ckpt.groups[key]}")
        if token not in self.spool.entries:
            self.spool.add(token, t)
        self.keys[key] = token

    def write_buffers(self, extra: dict[str, torch.Tensor]) -> None:
        """Buffers outside the state dict (stored so meta skeletons complete), before any unit
        is released to the meta device."""
        for k, t in extra.items():
            self.add(k, t)

    def bar(self, items, desc: str):
        from tqdm.auto import tqdm
        return tqdm(list(items), desc=desc, disable=not self.progress, unit="unit", file=sys.stderr)
