"""`TableEmbeddingBag`: ``torch.nn.EmbeddingBag``'s interface over any table store.

The table is looked up (dequantized rows of the asked keys only), then bags are reduced with
``torch.nn.functional.embedding_bag`` over those rows, so sum / mean and per-sample weights follow
torch's semantics exactly. The table is frozen: no gradient flows into it.
"""
from __future__ import annotations

import numpy as np
import torch

from .format import TableError

MODES = ("sum", "mean")


class TableEmbeddingBag(torch.nn.Module):
    """``forward(keys, offsets=None, per_sample_weights=None)`` -> (bags, dim) float32.

    keys: 1-D (with offsets: bag ``i`` is ``keys[offsets[i]:offsets[i+1]]``) or 2-D (B, L), one bag a
    row; int64 tensor or any integer array (uint64 feature hashes as a numpy array).
    """

    def __init__(self, table, mode: str = "sum", on_missing: str = "error") -> None:
        super().__init__()
        if mode not in MODES:
            raise TableError(f"mode must be one of {MODES}, found {mode!r}")
        self.table, self.mode, self.on_missing = table, mode, on_missing

    def forward(self, keys, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_versioned(keys, offsets, per_sample_weights)[0]

    def forward_versioned(self, keys, offsets: torch.Tensor | None = None,
                          per_sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """`forward` plus the table version that answered (None for a store that has no versions)."""
        k = keys.detach().cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        if k.ndim == 2:
            if offsets is not None:
                raise TableError("offsets must be None when keys are 2-D (B, L)")
            offsets = torch.arange(0, k.size, max(k.shape[1], 1), dtype=torch.int64)[:k.shape[0]]
        elif k.ndim != 1 or offsets is None:
            raise TableError(f"keys must be 1-D with offsets, or 2-D (B, L); found {k.ndim}-D, "
                             f"offsets {'given' if offsets is not None else 'missing'}")
        if per_sample_weights is not None and self.mode != "sum":
            raise TableError("per_sample_weights need mode='sum' (as in torch.nn.EmbeddingBag)")
        if hasattr(self.table, "lookup_versioned"):
            found, version = self.table.lookup_versioned(k.reshape(-1), on_missing=self.on_missing)
        else:
            found, version = self.table.lookup(k.reshape(-1), on_missing=self.on_missing), None
        rows = torch.from_numpy(np.ascontiguousarray(found))
        ids = torch.arange(rows.shape[0], dtype=torch.int64)  # each looked-up row once, in order
        psw = None if per_sample_weights is None else per_sample_weights.reshape(-1).float()
        return torch.nn.functional.embedding_bag(ids, rows, torch.as_tensor(offsets, dtype=torch.int64),
                                                 mode=self.mode, per_sample_weights=psw), version

    def extra_repr(self) -> str:
        return f"{self.table!r}, mode={self.mode!r}"
