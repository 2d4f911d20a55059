"""`LowbitHfQuantizer`: lowbit inside transformers' `from_pretrained` and `save_pretrained`.

Two routes, both through the hooks of transformers' `HfQuantizer`:

* a saved lowbit folder (config.json has ``quantization_config.quant_method == "lowbit"``):
  before the weights are read, the checkpoint is verified whole (header seal, tensors of every
  shard, side files) and each layer the header lists is swapped for its quantized twin on the meta
  device (`lowbit.io.skeleton.build_skeleton`, i.e. `apply`); transformers then assigns
  ``qdata``/``scale``/``zero_point`` by key without casting them; afterwards every layer's tensors
  are validated, derived kernel state rebuilt, buffers and ties restored as `lowbit.load` does.
* load-time quantization (``quantization_config=LowbitConfig(...)`` on a float checkpoint): the
  plan is made on the meta model exactly as `lowbit.quantize` makes it; transformers reads the
  checkpoint one tensor at a time and hands each planned weight to `LowbitQuantize`, which
  quantizes that one layer through `apply` and drops its float weight. The fp32 model is never
  whole in memory.

`save_pretrained` writes lowbit's format: the tensors and sealed header of `lowbit.save`
(``get_state_dict_and_metadata``); config.json carries ``quantization_config``.
"""
from __future__ import annotations

import json
import re
import sys

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..apply import Report, apply
from ..errors import FormatError, LowbitError, QuantizationError
from ..nn import QuantizedModule
from ..io.format import encode_header
from ..memory import release_freed_memory
from ..io.restore import _restore_buffers, _retie
from ..io.serialize import state_and_header
from ..io.skeleton import build_skeleton, finish_loaded, verify_files
from ..recipe import Plan, plan

# config keys that may differ between a file's header and config.json without changing the model
_CONFIG_NOISE = {"quantization_config", "_name_or_path", "name_or_path", "transformers_version",
                 "dtype", "torch_dtype", "architectures", "_commit_hash", "use_cache"}


class LowbitQuantize(ConversionOps):
    """Load-time quantization of one layer as its float weight arrives."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        return self.hf_quantizer.quantize_layer(model, full_layer_name, value, missing_keys)


class LowbitHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.plan: Plan | None = None
        self.report = Report()
        self.doc: dict | None = None
        self.files: list[str] = []
        self.quant_keys: set[str] = set()
        self.errors: list[str] = []

    def validate_environment(self, device_map=None, **kwargs) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        bad = sorted(str(d) for d in devices if d is not None and str(d) not in ("cpu", "cpu:0"))
        if bad:
            raise ValueError(f"lowbit runs on the CPU: device_map must be None or 'cpu', found {bad}")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            self._prepare_saved(model, checkpoint_files)
        else:
            self.plan = plan(model, self.quantization_config.recipe(),
                             allow_empty=self.quantization_config.allow_empty)
            self.report = Report(skipped=dict(self.plan.skipped), aliases=dict(self.plan.aliases))
        return model

    def _prepare_saved(self, model, checkpoint_files) -> None:
        self.files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if not self.files:
            raise FormatError("a lowbit checkpoint is safetensors files with a lowbit header; "
                              f"found {list(checkpoint_files or [])}")
        self.doc = verify_files(self.files)
        _check_config(model.config, self.doc, self.files[0])
        self.report = build_skeleton(model, self.doc, self.files[0])
        self.quant_keys = {f"{a}.{t}" for n, e in self.doc["layers"].items()
                           for a in [n] + e["aliases"] for t in e["tensors"]}
        ignore = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {
            f"^{re.escape(k)}$" for k in self.doc["nonpersistent"]}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self.plan is None:
            return False
        name, _, tensor = param_name.rpartition(".")
        return tensor == "weight" and name in self.plan.layers

    def get_quantize_ops(self):
        return LowbitQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        """Codes and quantization parameters load as stored: never cast."""
        key = (getattr(converter, "target_patterns", None) or [None])[0]
        if key in self.quant_keys:
            return None
        return super().get_new_dtype(converter, param, dtype)

    def quantize_layer(self, model, full_name: str, value: torch.Tensor, missing_keys) -> dict:
        """Quantize the layer owning ``full_name`` (its ``.weight``) from ``value``, in place."""
        name = full_name.rpartition(".")[0]
        aliases = {a: n for a, n in self.plan.aliases.items() if n == name}
        module = model.get_submodule(name)
        module._parameters["weight"] = torch.nn.Parameter(value, requires_grad=False)
        try:
            done = apply(model, Plan({name: self.plan.layers[name]}, {}, aliases))
        except LowbitError as exc:
            self.errors.append(str(exc))
            raise
        release_freed_memory()
        self.report.layers += done.layers
        self.report.warnings += done.warnings
        if missing_keys is not None:
            for n in [name, *aliases]:
                missing_keys.discard(f"{n}.weight")
        return {}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.errors:
            raise QuantizationError("lowbit: " + "; ".join(self.errors))
        if self.pre_quantized:
            self._finish_saved(model)
        else:
            self._finish_quantized(model)
        return model

    def _finish_saved(self, model) -> None:
        from safetensors import safe_open
        path = self.files[0]
        buffers = {}
        for f in self.files:
            with safe_open(f, framework="pt") as h:
                buffers.update({k: h.get_tensor(k) for k in self.doc["nonpersistent"] if k in h.keys()})
        _restore_buffers(model, buffers, path)
        finish_loaded(model, path)
        release_freed_memory()
        _retie(model, self.doc["tied"], path)
        model.lowbit_source = {k: v for k, v in self.doc["provenance"].items()
                               if k in ("scheme", "method", "source_sha256", "targets", "ignore")}

    def _finish_quantized(self, model) -> None:
        missing = [n for n in self.plan.layers if not hasattr(model.get_submodule(n), "qdata")]
        if missing:
            raise QuantizationError(f"lowbit: the checkpoint held no weight for planned layer(s) "
                                    f"{missing[:5]}")
        on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
        if on_meta:
            raise QuantizationError(f"lowbit: {on_meta[:5]} were not in the checkpoint")
        _own_float_tensors(model)
        config = self.quantization_config
        model.lowbit_source = {"scheme": config.scheme if isinstance(config.scheme, str) else
                               config.recipe().to_json(), "method": config.method,
                               "targets": config.targets, "ignore": list(config.ignore)}
        model.lowbit_report = self.report
        print(self.report, file=sys.stderr)

    def get_state_dict_and_metadata(self, model):
        """What save_pretrained writes: lowbit's tensors and sealed header (format 2)."""
        tensors, doc = state_and_header(model)
        return tensors, encode_header(doc)

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _own_float_tensors(model) -> None:
    """Copy the float parts (norms, biases, unquantized layers, quantized layers' biases) out of the
    memory-mapped fp32 checkpoint: a tensor viewing the mapping keeps every page of the fp32 file
    that quantization read resident. They are small; the Parameter objects (and ties) stay."""
    for module in model.modules():
        kept = module.tensor_names if isinstance(module, QuantizedModule) else ()
        buffers = [t for k, t in module._buffers.items() if k not in kept]
        for t in list(module._parameters.values()) + buffers:
            if t is not None and not t.is_meta:
                t.data = t.data.clone()


def _check_config(config, doc: dict, path: str) -> None:
    """config.json (which transformers built the model from) must agree with the config sealed
    in the header: an edited config.json beside the weights is an error, not a different model."""
    saved = (doc.get("model") or {}).get("config")
    if not isinstance(saved, dict):
        return
    now = json.loads(config.to_json_string(use_diff=False))  # as JSON: int keys become strings
    diff = sorted(k for k, v in saved.items() if k not in _CONFIG_NOISE and not k.startswith("_")
                  and k in now and now[k] != v)
    if diff:
        raise FormatError(f"{path}: config.json disagrees with the config sealed in the lowbit header "
                          f"on {diff[:5]} (e.g. {diff[0]}: {now[diff[0]]!r} vs {saved[diff[0]]!r})")
