"""A streaming histogram per channel, and the int8 round-trip error of a range measured on it.

Bins are anchored at zero: bin ``k`` of a channel holds the values in ``[k * width, (k+1) * width)``
and the channel keeps the counts of ``bins`` consecutive bins starting at ``start``::

    counts[c, j]  counts values in  [(start[c] + j) * width[c], (start[c] + j + 1) * width[c])

When new values fall outside, the width doubles (``m`` times) until every value seen fits: old bin
``k`` then lies wholly inside new bin ``floor(k / 2**m)``, so merging loses nothing that a
histogram built at the coarser width from the start would have kept (doubling is exact in
floating point). Counts are float64; the exact minimum and maximum are kept beside the counts.

Errors are measured at bin centres, each weighted by its count: with 2048 bins over a range that
int8 splits into 255 steps, one step spans at least 8 bins, and a centre is within half a bin of
every value it stands for.
"""
from __future__ import annotations

import torch

from ..primitives.affine import fake_quantize_groups, params_from_range
from ..spec import QuantSpec

# evaluate at most this many (channel, candidate, bin) points at once, to bound memory
ERROR_CHUNK_ELEMENTS = 1 << 22
# the first width of a channel whose values were all equal (relative to their magnitude)
MIN_RELATIVE_WIDTH = 2.0 ** -20


def int8_spec(symmetric: bool) -> QuantSpec:
    """The activation grid an observer's range is judged on: int8, one range per group."""
    return QuantSpec(bits=8, symmetric=symmetric, granularity="tensor", scale_dtype="float32")


class StreamingHistogram:
    """Histograms of ``channels`` columns of 2-D batches ``(rows, channels)``."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.width: torch.Tensor | None = None  # (C,) float64
        self.start: torch.Tensor | None = None  # (C,) int64, index of the first kept bin
        self.counts: torch.Tensor | None = None  # (C, bins) float64
        self.lo: torch.Tensor | None = None  # (C,) float64, exact minimum seen
        self.hi: torch.Tensor | None = None  # (C,) float64, exact maximum seen

    @property
    def empty(self) -> bool:
        return self.counts is None

    def update(self, x2d: torch.Tensor) -> None:
        x = x2d.detach().double()  # (N, C)
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        if self.empty:
            span = torch.maximum(hi - lo, torch.maximum(lo.abs(), hi.abs()) * MIN_RELATIVE_WIDTH)
            self.width = (span / (self.bins - 1)).clamp(min=torch.finfo(torch.float64).tiny)
            self.lo, self.hi = lo, hi
            self.start = torch.floor(lo / self.width).long()
            self.counts = torch.zeros(x.shape[1], self.bins, dtype=torch.float64)
        else:
            self._grow(torch.minimum(self.lo, lo), torch.maximum(self.hi, hi))
        self._add(x)

    def _grow(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Double widths until ``[lo, hi]`` fits in ``bins`` bins, merging old bins exactly."""
        m = torch.zeros_like(self.start)
        while True:
            width = self.width * torch.pow(2.0, m.double())
            first, last = torch.floor(lo / width).long(), torch.floor(hi / width).long()
            short = last - first + 1 > self.bins
            if not short.any():
                break
            m = m + short.long()
        old_abs = self.start.unsqueeze(1) + torch.arange(self.bins)  # (C, bins) absolute bin index
        new_abs = torch.div(old_abs, (2 ** m).unsqueeze(1), rounding_mode="floor")
        merged = torch.zeros_like(self.counts)
        merged.scatter_add_(1, (new_abs - first.unsqueeze(1)).clamp(0, self.bins - 1), self.counts)
        self.width, self.start, self.counts, self.lo, self.hi = width, first, merged, lo, hi

    def _add(self, x: torch.Tensor) -> None:
        idx = (torch.floor(x / self.width).long() - self.start).clamp_(0, self.bins - 1)  # (N, C)
        flat = idx + torch.arange(x.shape[1]) * self.bins  # (N, C): index into counts.view(-1)
        self.counts += torch.bincount(flat.reshape(-1), minlength=self.counts.numel()).reshape(self.counts.shape)

    def edges(self) -> torch.Tensor:
        """Lower edges of the kept bins, (C, bins), and the upper edge of the last as column bins."""
        j = torch.arange(self.bins + 1, dtype=torch.float64)
        return (self.start.double().unsqueeze(1) + j) * self.width.unsqueeze(1)  # (C, bins + 1)

    def centers(self) -> torch.Tensor:
        e = self.edges()
        return (e[:, :-1] + e[:, 1:]) / 2  # (C, bins)

    def quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile (0..1) per channel, interpolated linearly inside its bin and kept
        within the exact min and max; off from the exact value by at most one bin width."""
        cum = self.counts.cumsum(dim=1)  # (C, bins)
        target = (q * cum[:, -1]).unsqueeze(1)  # (C, 1)
        j = torch.searchsorted(cum, target).clamp(max=self.bins - 1)  # first bin with cum >= target
        before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
        inside = self.counts.gather(1, j).clamp(min=1e-300)
        frac = ((target - before) / inside).clamp(0.0, 1.0)
        value = self.edges().gather(1, j) + frac * self.width.unsqueeze(1)
        return torch.minimum(torch.maximum(value.squeeze(1), self.lo), self.hi)

    def state(self) -> dict:
        return {"width": self.width.tolist(), "start": self.start.tolist(),
                "counts": self.counts.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist()}

    def load_state(self, s: dict) -> None:
        self.width = torch.tensor(s["width"], dtype=torch.float64)
        self.start = torch.tensor(s["start"], dtype=torch.int64)
        self.counts = torch.tensor(s["counts"], dtype=torch.float64).reshape(-1, self.bins)
        self.lo = torch.tensor(s["lo"], dtype=torch.float64)
        self.hi = torch.tensor(s["hi"], dtype=torch.float64)


def weighted_error(values: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   spec: QuantSpec) -> torch.Tensor:
    """Sum of ``weights * (fake_quant(values) - values)**2`` for each candidate range.

    ``values``, ``weights``: (C, B); ``lo``, ``hi``: (C, K) candidate ranges -> errors (C, K).
    The rounding is `lowbit.primitives.affine`'s; chunks over channels bound the memory.
    """
    c, b = values.shape
    k = lo.shape[1]
    per = max(1, ERROR_CHUNK_ELEMENTS // max(1, k * b))
    out = []
    for s in range(0, c, per):
        v = values[s:s + per].float().unsqueeze(1).expand(-1, k, b)  # (c', K, B)
        scale, zp = params_from_range(lo[s:s + per], hi[s:s + per], spec)  # (c', K)
        err = (fake_quantize_groups(v, scale, zp, spec) - v).double().square()
        out.append((err * weights[s:s + per].unsqueeze(1)).sum(dim=-1))
    return torch.cat(out)
