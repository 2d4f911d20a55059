"""What every quantized module shares: its weight's tensors as buffers, and derived state rebuilt
in exactly one place (`rebuild`) on every path that changes those tensors.

One copy of the codes: a layer may keep its ``qdata`` buffer in a kernel's layout
(``self.layout``, one of `kernels.layout.LAYOUTS`; a subclass's `_derive` picks it with
`_keep_codes`). `state_dict` still writes the file layout (derived on save), `qweight` is always
the file-layout weight (derived when asked for, so not for hot paths), and a load first puts an
empty file-layout buffer in place, checks what arrives, then `rebuild` converts it to the kept
layout and drops the file form.

Paths that change tensors: construction, `load_state_dict` (copy or ``assign=True``), casts and
moves (`.float()`, `.half()`, `.to(...)`, `.to_empty(...)`). A cast keeps the codes and the
quantization parameters as they are (they *are* the quantized weight); float parts (bias) cast as
usual, and the module's compute dtype follows the cast: outputs come back in the input's dtype
(`QEmbedding`, which has no float input, in ``compute_dtype``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import QuantizationError
from ..kernels.layout import Codes, to_file
from ..primitives import QuantizedWeight
from ..spec import ActSpec, QuantSpec


def check_ids(flat: torch.Tensor, num_embeddings: int) -> None:
    """Embedding ids outside ``[0, num_embeddings)`` raise `IndexError`, as `nn.Embedding` does
    (a negative id would otherwise wrap around to the last rows)."""
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_embeddings):
        bad = flat[(flat < 0) | (flat >= num_embeddings)][0]
        raise IndexError(f"index {int(bad)} is out of range for an embedding table of "
                         f"{num_embeddings} rows")


class QuantizedModule(torch.nn.Module):
    """Holds the weight kind's tensors (``qdata``, ``scale``, ``zero_point`` for affine weights) as
    buffers, plus spec, input spec, method and the SQNR measured when quantized (None if unknown)."""

    WEIGHT_KIND = QuantizedWeight

    def _set_weight(self, qw: QuantizedWeight, method: str, sqnr_db: float | None,
                    input_spec: ActSpec | None = None) -> None:
        self.spec: QuantSpec = qw.spec
        self.input_spec = input_spec
        self.method = method
        self.sqnr_db = sqnr_db
        self.weight_shape = tuple(qw.shape)
        self.compute_dtype = torch.float32
        self.tensor_names = qw.tensor_names(qw.spec)
        self.layout = "file"  # of the qdata buffer; `_derive` may keep a kernel's layout instead
        for key, t in qw.tensors().items():
            self.register_buffer(key, t)
        if "zero_point" not in self.tensor_names:
            self.zero_point = None

    @property
    def qweight(self) -> QuantizedWeight:
        """The weight in the file layout (the codes converted from the kept layout if need be)."""
        return QuantizedWeight(self.file_qdata(), self.scale, self.zero_point, self.spec,
                               self.weight_shape)

    @property
    def codes(self) -> Codes:
        """The codes as kept (2-D weights), for paths that read any layout."""
        rows = self.weight_shape[0]
        return Codes(self.qdata, getattr(self, "layout", "file"), self.spec.bits,
                     (rows, self.qweight_cols))

    @property
    def qweight_cols(self) -> int:
        n = 1
        for d in self.weight_shape[1:]:
            n *= d
        return n

    def file_qdata(self) -> torch.Tensor:
        """``qdata`` in the file layout: the buffer itself, or derived from the kept layout."""
        if getattr(self, "layout", "file") == "file":
            return self.qdata
        return to_file(self.codes, self._file_qdata_shape())

    def _file_qdata_shape(self) -> tuple[int, int]:
        from ..primitives.packing import packed_cols
        return (self.weight_shape[0], packed_cols(self.qweight_cols, self.spec.bits))

    def _keep_codes(self, data: torch.Tensor, layout: str) -> None:
        """Make ``data`` (the codes in ``layout``) the one stored copy of the codes."""
        self._buffers["qdata"] = data
        self.layout = layout

    def rebuild(self) -> None:
        """Derive runtime state (kernel layouts, cached parameters) from the stored tensors.
        The only place derived state is made; subclasses override `_derive`."""
        if self.qdata.is_meta:
            self._derive_none()
        else:
            self._derive()

    def _derive(self) -> None:
        """Build derived state; nothing by default."""

    def _derive_none(self) -> None:
        """No derived state while the tensors are on the meta device."""

    def layer_meta(self) -> dict[str, Any]:
        """This layer's entry in a file header: class, weight kind and its meta, input spec,
        method, SQNR, its tensors' names and the compute dtype."""
        return {"class": type(self).__name__, "kind": self.WEIGHT_KIND.KIND,
                **self._params_qweight().meta(),
                "input": None if self.input_spec is None else self.input_spec.to_dict(),
                "method": self.method, "sqnr_db": self.sqnr_db, "tensors": list(self.tensor_names),
                "dtype": str(self.compute_dtype).removeprefix("torch.")}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        return self._params_qweight().nbytes

    def _params_qweight(self) -> QuantizedWeight:
        """The weight with its codes as kept: for its meta and byte count only (every layout has
        the file layout's number of bytes), never for its values."""
        return QuantizedWeight(self.qdata, self.scale, self.zero_point, self.spec, self.weight_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The file layout of the codes, derived once per `state_dict` call: a module reached
        under two names gives the very same tensor twice, so saving still finds the tie."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(self, "layout", "file") != "file" and prefix + "qdata" in destination:
            memo = getattr(destination, "__dict__", {}).setdefault("_lowbit_file_codes", {})
            if id(self) not in memo:
                memo[id(self)] = self.file_qdata()
            destination[prefix + "qdata"] = memo[id(self)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if getattr(self, "layout", "file") != "file" and prefix + "qdata" in state_dict:
            # the file form arrives: an empty file-layout buffer to copy into (or assign over)
            self._keep_codes(torch.empty(self._file_qdata_shape(), dtype=torch.uint8,
                                         device=self.qdata.device), "file")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        name = prefix.rstrip(".") or type(self).__name__
        try:
            self.qweight.check(name)
            if not self.qdata.is_meta:
                self.qweight.validate(name)
        except QuantizationError as exc:
            raise QuantizationError(f"load_state_dict: {exc}") from None
        self.rebuild()

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in self.tensor_names}
        probe = torch.empty(0, dtype=self.compute_dtype)
        super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new.dtype != old.dtype:  # a cast: the quantized tensors keep their dtype
                self._buffers[key] = old.to(new.device)
        cast = fn(probe)
        if cast.is_floating_point() and cast.dtype != probe.dtype:
            self.compute_dtype = cast.dtype
        self.rebuild()
        return self

    def _float_bias(self) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)
        return None if bias is None else bias.float()

    def extra_repr(self) -> str:
        scheme = self.spec.name + ("" if self.input_spec is None else f" +{self.input_spec.name}")
        return f"shape={self.weight_shape}, scheme={scheme}, method={self.method}"
