"""`QEmbedding`: a row-wise quantized embedding table; lookups unpack only the rows they touch."""
from __future__ import annotations

import torch

from ..primitives import QuantizedWeight
from ..primitives.affine import dequantize_codes
from ..primitives.packing import unpack
from ..spec import ActSpec
from .base import QuantizedModule, check_ids
from .registry import register


@register(torch.nn.Embedding, "affine")
class QEmbedding(QuantizedModule):
    """Each row is packed on its own (per-row scale and zero point, i.e. scale and bias
    ``bias = -zero_point * scale``), so a lookup gathers packed rows and dequantizes just those.
    Ids outside ``[0, num_embeddings)`` raise `IndexError`, as `nn.Embedding` does."""

    def __init__(self, qw: QuantizedWeight, padding_idx: int | None = None, method: str = "rtn",
                 sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = padding_idx
        self._set_weight(qw, method, sqnr_db, input_spec)
        self.rebuild()

    @classmethod
    def from_float(cls, emb: torch.nn.Embedding, qw: QuantizedWeight, method: str = "rtn",
                   sqnr_db: float | None = None, input_spec: ActSpec | None = None) -> "QEmbedding":
        return cls(qw, emb.padding_idx, method, sqnr_db, input_spec)

    def _rows(self, t: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor | None:
        """Per-row parameters for the looked-up rows; a per-tensor one is shared by all."""
        if t is None:
            return None
        return t.expand(flat.numel(), -1) if self.spec.granularity == "tensor" else t[flat]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        check_ids(flat, self.num_embeddings)
        q = unpack(self.qdata[flat], self.spec.bits, self.embedding_dim)  # (n, dim)
        scale, zp = self._rows(self.scale, flat), self._rows(self.zero_point, flat)  # (n, G)
        rows, groups = q.shape[0], scale.shape[1]
        out = dequantize_codes(q.view(rows, groups, -1), scale, zp, self.spec, self.compute_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)  # (n, G, dim // G) -> (*ids, dim)
