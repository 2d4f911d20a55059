"""What every quantized module shares: its weight's tensors as buffers, and derived state rebuilt
in exactly one place (`rebuild`) on every path that changes those tensors.

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
        for key, t in qw.tensors().items():
            self.register_buffer(key, t)
        if "zero_point" not in self.tensor_names:
            self.zero_point = None

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.scale, self.zero_point, self.spec, self.weight_shape)

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
                **self.qweight.meta(),
                "input": None if self.input_spec is None else self.input_spec.to_dict(),
                "method": self.method, "sqnr_db": self.sqnr_db, "tensors": list(self.tensor_names),
                "dtype": str(self.compute_dtype).removeprefix("torch.")}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        return self.qweight.nbytes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
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
