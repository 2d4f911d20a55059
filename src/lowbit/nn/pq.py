"""`PQLinear`, `PQConv2d`, `PQEmbedding`: layers whose weight is a product-quantized
`CodebookWeight` (iPQ, Stock et al., arXiv 1907.05686). PQLinear runs the forms of
`lowbit.kernels.pq`; PQConv2d gathers its weight from the centroids on each call (no faster form built yet);
PQEmbedding gathers only the looked-up rows' centroids.

State dict (the file's tensors, names from `CodebookWeight.tensors`): ``centroids`` (a Parameter,
frozen unless `train_centroids(True)`), ``assignments`` (uint8 buffer), ``bias``. The forms'
derived index tensors and the optional cached float weight are rebuilt in one place
(`_derived`), keyed on the identity and version counter of ``centroids`` and ``assignments``, so
``load_state_dict``, ``.to()`` and optimizer steps on the centroids can never leave them stale.

Runtime memory beyond the file's bytes: an index per block for the forms a layer takes (int32
for ``tiled`` / ``gather`` / ``bf16`` / ``bf16-jit`` (its `pq_jit.RowGather`), int32 for ``lut``, int64 for ``lutg``, uint8 for ``jit``
(int32 above 256 centroids); the others' are dropped once the selector has chosen), float32,
transposed float32 and bf16 copies of the centroids (k*block_size values each), plus out*in*4 bytes with ``cache=True`` only: no decoded weight is
kept otherwise.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import pq, pq_jit
from ..kernels.select import row_bucket, shape_class
from ..primitives.codebook import CodebookError, CodebookWeight, unpack_assignments
from ..spec import ActSpec
from .base import QuantizedModule, check_ids
from .registry import register
from .selection import selector_of, timing_input


class PQModule(QuantizedModule):
    """Shared state of the PQ layers: ``centroids`` (a Parameter, frozen unless
    `train_centroids(True)`) and ``assignments`` (a uint8 buffer), the codebook's own names.

    The `QuantizedModule` protocol for the ``codebook`` weight kind: ``tensor_names``,
    `layer_meta` (the file header entry), derived state dropped in `rebuild` on loads and casts,
    and casts that keep the codebook's dtypes (the compute dtype follows the cast)."""

    WEIGHT_KIND = CodebookWeight

    def _set_codebook(self, cw: CodebookWeight, name: str, method: str = "ipq",
                      sqnr_db: float | None = None) -> None:
        cw.check(name)
        self.weight_shape, self.block_size = tuple(cw.shape), cw.block_size
        self.centroids = torch.nn.Parameter(cw.centroids.clone(), requires_grad=False)
        self.centroid_dtype = cw.centroids.dtype  # stored dtype (float32 while training)
        self.register_buffer("assignments", cw.assignments.clone())
        self.input_spec, self.method, self.sqnr_db = None, method, sqnr_db
        self.compute_dtype = torch.float32
        self.tensor_names = CodebookWeight.tensor_names_for({})

    @property
    def codebook(self) -> CodebookWeight:
        return CodebookWeight(self.centroids.detach(), self.assignments, self.weight_shape,
                              self.block_size)

    @property
    def qweight(self) -> CodebookWeight:  # the QuantizedModule name for the module's weight
        return self.codebook

    @property
    def weight_nbytes(self) -> int:
        return self.codebook.nbytes

    def train_centroids(self, on: bool = True) -> None:
        """Let an optimizer update the centroids (iPQ's finetuning between stages); create the
        optimizer after this call. While training, float16 centroids are held as a float32
        Parameter (an optimizer's steps and eps underflow in float16; Adam turns them into NaN);
        ``train_centroids(False)`` rounds them back to the stored dtype."""
        stored = getattr(self, "centroid_dtype", self.centroids.dtype)
        self.centroid_dtype = stored
        want = torch.float32 if on else stored
        if self.centroids.dtype != want:
            self.centroids = torch.nn.Parameter(self.centroids.detach().to(want), requires_grad=on)
        self.centroids.requires_grad_(on)

    def tensors(self) -> dict[str, torch.Tensor]:
        """This layer's stored tensors by name (the weight's own names, plus ``bias``)."""
        out = dict(self.codebook.tensors())
        if getattr(self, "bias", None) is not None:
            out["bias"] = self.bias.detach()
        return out

    def _index(self) -> torch.Tensor:
        """int64 (rows, n_blocks) centroid indices (unpacked per call: cheap next to the gather)."""
        return self.codebook.indices()

    def rebuild(self) -> None:
        """Drop derived state; it is rebuilt lazily (and keyed on the tensors it derives from)."""
        if hasattr(self, "_derived_state"):
            self._derived_state.clear()
        self.__dict__.pop("_jit_np", None)  # `PQLinear._jit_arrays`: views of dropped tensors

    def layer_meta(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "kind": CodebookWeight.KIND,
                **self.codebook.meta(), "input": None, "method": self.method,
                "sqnr_db": self.sqnr_db, "tensors": list(self.tensor_names),
                "dtype": str(self.compute_dtype).removeprefix("torch.")}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        torch.nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        name = prefix.rstrip(".") or type(self).__name__
        try:
            self.codebook.check(name)
        except CodebookError as exc:
            raise CodebookError(f"load_state_dict: {exc}") from None
        self.rebuild()

    def extra_repr(self) -> str:
        return (f"shape={self.weight_shape}, k={self.centroids.shape[0]}, "
                f"block_size={self.block_size}, method={self.method}")

    def _apply(self, fn, recurse=True):
        """A cast keeps centroids and assignments in their stored dtypes (they are the weight);
        moves move them; the compute dtype follows a floating cast."""
        cent, assign = self.centroids.data, self.assignments
        grad = self.centroids.requires_grad
        probe = torch.empty(0, dtype=self.compute_dtype)
        torch.nn.Module._apply(self, fn, recurse)
        if self.centroids.dtype != cent.dtype:
            self.centroids = torch.nn.Parameter(cent.to(self.centroids.device), requires_grad=grad)
        if self.assignments.dtype != assign.dtype:
            self._buffers["assignments"] = assign.to(self.assignments.device)
        cast = fn(probe)
        if cast.is_floating_point() and cast.dtype != probe.dtype:
            self.compute_dtype = cast.dtype
        self.rebuild()
        return self


@register(torch.nn.Linear, "codebook")
class PQLinear(PQModule):
    """y = x @ W^T + b with W = centroids[assignments] (blocks of ``block_size`` inputs).

    ``cache=True`` keeps the reconstructed fp32 weight (fp32's speed, fp32's memory); otherwise
    the form for M rows is the one of `kernels.pq.SELECTABLE` measured fastest on this host
    (`kernels.select`, per shape class and row bucket, cached on disk; ``LOWBIT_KERNEL`` and a
    layer's ``selector`` pin it by selector name, ``pq-<form>``). ``set_form`` pins one of
    `kernels.pq.FORMS`. While the centroids require grad and grad is enabled, the
    differentiable gather form runs.
    """

    def __init__(self, cw: CodebookWeight, bias: torch.Tensor | None = None, cache: bool = False,
                 name: str = "weight", method: str = "ipq", sqnr_db: float | None = None) -> None:
        super().__init__()
        if len(cw.shape) != 2:
            raise ValueError(f"{name}: PQLinear needs a 2-D (out, in) codebook weight, found {cw.shape}")
        self._set_codebook(cw, name, method, sqnr_db)
        self.out_features, self.in_features = cw.shape
        self.cache = cache
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone(),
                                                                 requires_grad=False)
        self.force_form: str | None = None
        self.selector = None  # None: `nn.selection.default_selector()`
        self._paths: dict[str, str] = {}  # row bucket -> form measured fastest here
        self._by_rows: dict[int, str] = {}  # row count -> its bucket's form (`_select`)
        self._derived_state: dict[str, tuple[tuple, torch.Tensor]] = {}  # key -> (stamp, tensor)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, cw: CodebookWeight, method: str = "ipq",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None, *,
                   cache: bool = False, name: str = "weight") -> "PQLinear":
        _no_inputs(input_spec, name)
        if tuple(cw.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: codebook shape {cw.shape} does not match the Linear's "
                             f"{tuple(linear.weight.shape)}")
        return cls(cw, linear.bias, cache, name, method, sqnr_db)

    def set_form(self, form: str | None) -> None:
        if form is not None and form not in pq.FORMS:
            raise ValueError(f"unknown PQ form {form!r}; forms: {pq.FORMS}")
        self.force_form = form

    # derived tensor -> what it derives from ("c": centroids, "a": assignments) and its builder
    _DERIVED = {"weight": ("ca", pq.reconstruct), "lut": ("a", pq.lut_index),
                "bags": ("a", pq.lut_bags), "flat": ("a", pq.flat_assign),
                "lutg": ("a", pq.lutg_index), "codes_t": ("a", pq_jit.jit_codes),
                "cent_t": ("c", pq_jit.jit_centroids),
                "cent32": ("c", lambda cw: cw.centroids.float()),
                "cent16": ("c", lambda cw: cw.centroids.to(torch.bfloat16)),
                "rows16": ("ca", lambda cw: pq_jit.RowGather(cw.centroids.to(torch.bfloat16),
                                                              pq.flat_assign(cw)))}
    _FORM_STATE = {"cached": ("weight",), "gather": ("flat", "cent32"), "tiled": ("flat", "cent32"),
                   "lut": ("lut", "bags", "cent32"), "lutg": ("lutg", "cent32"),
                   "bf16": ("flat", "cent16"), "bf16-jit": ("rows16",),
                   "jit": ("codes_t", "cent_t"), "ref": ()}

    def _derived(self, key: str) -> torch.Tensor:
        """A form's derived tensor, rebuilt whenever a tensor it derives from changed. A tensor's
        stamp is its storage address and version counter: ``.to()`` and loads replace or write
        the storage, optimizer steps bump the version."""
        c, a = self._parameters["centroids"], self._buffers["assignments"]
        deps, build = self._DERIVED[key]
        now = (((c.data_ptr(), c._version) if "c" in deps else ())
               + ((a.data_ptr(), a._version) if "a" in deps else ()))
        entry = self._derived_state.get(key)
        if entry is not None and entry[0] == now:
            return entry[1]
        value = build(self.codebook)
        self._derived_state[key] = (now, value)
        return value

    def shape_key(self) -> str:
        """The selector's weight-shape class: ``pq/w<index bits>g<block size>/<out>x<in>``."""
        bits = max(1, (self.centroids.shape[0] - 1).bit_length())
        return shape_class("pq", bits, self.block_size, self.out_features, self.in_features)

    def candidates(self) -> dict:
        """`kernels.pq.selectable()` as callables of a row count (what the selector times)."""
        x = timing_input(self.in_features)
        return {pq.SELECTOR_PREFIX + f: (lambda m, f=f: self._run(f, x(m), None))
                for f in pq.selectable()}

    def _reference(self):
        """The float layer (a reconstructed weight that lives only while the selector times)."""
        w, x = pq.reconstruct(self.codebook), timing_input(self.in_features)
        return lambda m: F.linear(x(m), w)

    def _select(self, rows: int) -> str:
        form = self._by_rows.get(rows)  # per call: one lookup (a 384x384 layer is ~120 us)
        if form is not None:
            return form
        bucket, _ = row_bucket(rows)
        form = self._paths.get(bucket)
        if form is None:
            with torch.no_grad():
                name = selector_of(self).choose(self.shape_key(), rows, self.candidates(),
                                                self._reference())
            form = self._paths[bucket] = name.removeprefix(pq.SELECTOR_PREFIX)
            keep = {k for f in self._paths.values() for k in self._FORM_STATE[f]}
            for k in set(self._derived_state) - keep:  # the losers' index tensors
                del self._derived_state[k]
            if "codes_t" not in keep:
                self.__dict__.pop("_jit_np", None)
        if len(self._by_rows) < 1024:
            self._by_rows[rows] = form
        return form

    def form_for(self, rows: int) -> str:
        if self._parameters["centroids"].requires_grad and torch.is_grad_enabled():
            return "gather"
        if self.force_form or self.cache:
            return self.force_form or "cached"
        return self._select(rows) if rows else "gather"

    def _run(self, form: str, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._parameters["centroids"].requires_grad and torch.is_grad_enabled():  # finetuning
            return pq.gather_linear(x2d, self.centroids.float(),
                                    self._derived("flat").view(self.out_features, -1), bias)
        d = self._derived
        if form == "bf16-jit":  # the prepared gather keeps its numpy views between calls
            r = d("rows16")
            return pq.bf16_linear(x2d, r.centroids, r.flat_assign, self.out_features, bias, rows=r)
        if form == "cached":
            return pq.cached_linear(x2d, d("weight"), bias)
        if form == "gather":  # index (out, n_blocks) int32
            return pq.gather_linear(x2d, d("cent32"), d("flat").view(self.out_features, -1), bias)
        if form == "tiled":
            return pq.tiled_linear(x2d, d("cent32"), d("flat"), self.out_features, bias)
        if form == "lut":
            return pq.lut_linear(x2d, d("cent32"), d("lut"), d("bags"), bias)
        if form == "lutg":
            return pq.lutg_linear(x2d, d("cent32"), d("lutg"), bias)
        if form == "bf16":
            return pq.bf16_linear(x2d, d("cent16"), d("flat"), self.out_features, bias)
        if form == "jit":
            c, a = d("cent_t"), d("codes_t")
            return pq_jit.jit_linear(x2d, c, a, bias, self._jit_arrays(c, a, bias))
        return pq.ref_linear(x2d, self.codebook, bias)

    def _jit_arrays(self, cent_t: torch.Tensor, codes_t: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple:
        """The ``jit`` kernel's numpy views of its state and the bias, kept while the tensors
        they view are the same objects (held here, so their memory cannot be reused) and the
        bias has the same storage and version."""
        stamp = None if bias is None else (bias.data_ptr(), bias._version)
        kept = getattr(self, "_jit_np", None)
        if kept is None or kept[0] is not cent_t or kept[1] is not codes_t or kept[2] != stamp:
            kept = self._jit_np = (cent_t, codes_t, stamp,
                                   pq_jit.jit_arrays(cent_t, codes_t, bias))
        return kept[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-call Python counts at few rows (a 384x384 GEMV is 14-25 us): no op that would
        # return its input (reshape of a 2-D input, float() of float32, to() of the same dtype)
        flat = x.dim() == 2 and x.shape[1] == self.in_features
        x2d = x if flat else x.reshape(-1, self.in_features)  # (M, in)
        bias = self._parameters.get("bias")
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        y = self._run(self.form_for(x2d.shape[0]), x2d, bias)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.centroids.shape[0]}, block_size={self.block_size}, cache={self.cache}")


@register(torch.nn.Conv2d, "codebook")
class PQConv2d(PQModule):
    """Conv2d with a codebook weight over blocks of in_channels*kh*kw (the paper's convention);
    the weight is gathered from the centroids on every call (differentiable in them)."""

    def __init__(self, cw: CodebookWeight, conv: torch.nn.Conv2d, name: str = "weight",
                 method: str = "ipq", sqnr_db: float | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: PQConv2d supports padding_mode='zeros' only, found "
                             f"{conv.padding_mode!r}")
        if tuple(cw.shape) != tuple(conv.weight.shape):
            raise ValueError(f"{name}: codebook shape {cw.shape} does not match the Conv2d's "
                             f"{tuple(conv.weight.shape)}")
        self._set_codebook(cw, name, method, sqnr_db)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.bias = None if conv.bias is None else torch.nn.Parameter(
            conv.bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, cw: CodebookWeight, method: str = "ipq",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None, *,
                   name: str = "weight") -> "PQConv2d":
        _no_inputs(input_spec, name)
        return cls(cw, conv, name, method, sqnr_db)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.embedding(self._index(), self.centroids.float()).reshape(self.weight_shape)
        b = None if self.bias is None else self.bias.float()
        y = F.conv2d(x.float(), w, b, self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)


@register(torch.nn.Embedding, "codebook")
class PQEmbedding(PQModule):
    """Embedding table with a codebook weight over blocks of ``block_size`` dimensions; a lookup
    gathers the looked-up rows' assignments, then their centroids."""

    def __init__(self, cw: CodebookWeight, padding_idx: int | None = None, name: str = "weight",
                 method: str = "ipq", sqnr_db: float | None = None) -> None:
        super().__init__()
        if len(cw.shape) != 2:
            raise ValueError(f"{name}: PQEmbedding needs a 2-D (num, dim) weight, found {cw.shape}")
        self._set_codebook(cw, name, method, sqnr_db)
        self.num_embeddings, self.embedding_dim = cw.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_float(cls, emb: torch.nn.Embedding, cw: CodebookWeight, method: str = "ipq",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None, *,
                   name: str = "weight") -> "PQEmbedding":
        _no_inputs(input_spec, name)
        if tuple(cw.shape) != tuple(emb.weight.shape):
            raise ValueError(f"{name}: codebook shape {cw.shape} does not match the Embedding's "
                             f"{tuple(emb.weight.shape)}")
        return cls(cw, emb.padding_idx, name, method, sqnr_db)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        check_ids(flat, self.num_embeddings)
        rows = unpack_assignments(self.assignments[flat], self.centroids.shape[0])  # (n, n_blocks)
        out = F.embedding(rows, self.centroids.float())  # (n, n_blocks, block_size)
        return out.reshape(*ids.shape, self.embedding_dim).to(self.compute_dtype)


def _no_inputs(input_spec: ActSpec | None, name: str) -> None:
    if input_spec is not None:
        raise ValueError(f"{name}: codebook layers take float inputs; quantized inputs "
                         f"({input_spec.name}) are not built for them")
