"""`PQLinear`: a Linear whose weight is a product-quantized `CodebookWeight` (iPQ, Stock et al.,
arXiv 1907.05686), computed by the forms of `lowbit.kernels.pq`.

State dict (the file's tensors, names from `CodebookWeight.tensors`): ``centroids`` (a Parameter,
frozen unless `train_centroids(True)`), ``assignments`` (uint8 buffer), ``bias``. The forms'
derived index tensors and the optional cached float weight are rebuilt in one place
(`_derived`), keyed on the identity and version counter of ``centroids`` and ``assignments``, so
``load_state_dict``, ``.to()`` and optimizer steps on the centroids can never leave them stale.

Runtime memory beyond the file's bytes: an int32 index per block for each of the ``lut`` and
``tiled`` forms used (built on first use), plus out*in*4 bytes with ``cache=True``.
"""
from __future__ import annotations

import torch

from ..kernels import pq
from ..primitives.codebook import CodebookWeight


class PQLinear(torch.nn.Module):
    """y = x @ W^T + b with W = centroids[assignments] (blocks of ``block_size`` inputs).

    ``cache=True`` keeps the reconstructed fp32 weight (fp32's speed, fp32's memory); otherwise
    `kernels.pq.choose_form` picks per call. ``force_form`` pins one of `kernels.pq.FORMS`.
    While the centroids require grad and grad is enabled, the differentiable gather form runs.
    """

    def __init__(self, cw: CodebookWeight, bias: torch.Tensor | None = None, cache: bool = False,
                 name: str = "weight") -> None:
        super().__init__()
        cw.check(name)
        if len(cw.shape) != 2:
            raise ValueError(f"{name}: PQLinear needs a 2-D (out, in) codebook weight, found {cw.shape}")
        self.out_features, self.in_features = cw.shape
        self.block_size, self.cache = cw.block_size, cache
        self.centroids = torch.nn.Parameter(cw.centroids.clone(), requires_grad=False)
        self.register_buffer("assignments", cw.assignments.clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone(),
                                                                 requires_grad=False)
        self.force_form: str | None = None
        self._derived_key: tuple | None = None
        self._derived_state: dict[str, torch.Tensor] = {}

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, cw: CodebookWeight, cache: bool = False,
                   name: str = "weight") -> "PQLinear":
        if tuple(cw.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: codebook shape {cw.shape} does not match the Linear's "
                             f"{tuple(linear.weight.shape)}")
        return cls(cw, linear.bias, cache, name)

    @property
    def codebook(self) -> CodebookWeight:
        return CodebookWeight(self.centroids.detach(), self.assignments,
                              (self.out_features, self.in_features), self.block_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """This layer's stored tensors by name (the weight's own names, plus ``bias``)."""
        out = dict(self.codebook.tensors())
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    @property
    def weight_nbytes(self) -> int:
        return self.codebook.nbytes

    def train_centroids(self, on: bool = True) -> None:
        """Let an optimizer update the centroids (iPQ's finetuning between stages)."""
        self.centroids.requires_grad_(on)

    def set_form(self, form: str | None) -> None:
        if form is not None and form not in pq.FORMS:
            raise ValueError(f"unknown PQ form {form!r}; forms: {pq.FORMS}")
        self.force_form = form

    def _derived(self, key: str) -> torch.Tensor:
        """A form's derived tensor, rebuilt whenever centroids or assignments changed."""
        now = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                    for t in (self.centroids, self.assignments))
        if now != self._derived_key:
            self._derived_key, self._derived_state = now, {}
        if key not in self._derived_state:
            build = {"weight": pq.reconstruct, "lut": pq.lut_index, "flat": pq.flat_assign}[key]
            self._derived_state[key] = build(self.codebook)
        return self._derived_state[key]

    def form_for(self, rows: int) -> str:
        grad = self.centroids.requires_grad and torch.is_grad_enabled()
        if grad:
            return "gather"
        return self.force_form or pq.choose_form(rows, self.out_features * self.in_features,
                                                 self.cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # (M, in)
        form = self.form_for(x2d.shape[0])
        bias = None if self.bias is None else self.bias.float()
        cent = self.centroids.float()
        if form == "cached":
            y = pq.cached_linear(x2d, self._derived("weight"), bias)
        elif form == "gather":
            index = self._derived("flat").view(self.out_features, -1)  # (out, n_blocks) int32
            y = pq.gather_linear(x2d, cent, index, bias)
        elif form == "tiled":
            y = pq.tiled_linear(x2d, cent, self._derived("flat"), self.out_features, bias)
        elif form == "lut":
            y = pq.lut_linear(x2d, cent, self._derived("lut"), bias)
        else:
            y = pq.ref_linear(x2d, self.codebook, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.centroids.shape[0]}, block_size={self.block_size}, cache={self.cache}")
