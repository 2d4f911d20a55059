"""Observers: streaming estimates of an activation's range ``(lo, hi)`` for static int8.

Each observer takes batches of any shape through ``update(x)`` and reports ``range()``: per tensor
(0-d ``lo``, ``hi``) or per channel along the last dimension (``(C,)``). ``symmetric=True`` gives
``(-a, a)``. Config and state round-trip through JSON (``to_dict`` / ``observer_from_dict``).

- ``minmax``: the extremes seen.
- ``ema``: moving-average min-max: the first batch sets the range, each later batch moves it by
  ``momentum * (batch extreme - current)`` (as the moving-average observers of PyTorch's PTQ).
- ``percentile``: the ``percentile``-th percentile (of ``|x|`` if symmetric, else the two tails
  ``100 - p`` and ``p``), estimated on a streaming histogram (`histogram.StreamingHistogram`, no
  reservoir): exact to one bin width, memory ``bins`` floats per channel whatever the stream.
- ``mse``: on the same histogram, the shrink of the min-max range (the grid of
  `primitives.ranges.mse_search`, ``steps`` points down to ``1 - MSE_MAX_SHRINK``) with the least
  int8 round-trip squared error.
- ``histogram``: the L2 choice of PyTorch's HistogramObserver (itself after TensorRT's entropy
  calibration, Migacz 2017, "8-bit Inference with TensorRT"): walk the bin range inwards, each step
  dropping the end bins that hold less mass, and keep the range with the least int8 round-trip
  squared error; ``steps`` candidates down to ``1 - HISTOGRAM_MAX_CLIP`` of the range.

Errors are measured with `lowbit.primitives.affine`'s rounding on the grid of `histogram.int8_spec`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..primitives.ranges import MSE_MAX_SHRINK
from .histogram import StreamingHistogram, int8_spec, weighted_error
from ..errors import LowbitError

OBSERVER_VERSION = 1
OBSERVER_NAMES = ("minmax", "ema", "percentile", "mse", "histogram")
HISTOGRAM_MAX_CLIP = 0.8
# which optional fields each observer reads; the others must keep their defaults
_FIELDS_USED = {"minmax": (), "ema": ("momentum",), "percentile": ("percentile", "bins"),
                "mse": ("bins", "steps"), "histogram": ("bins", "steps")}


class ObserverError(LowbitError):
    """A bad observer config, state or input; the message names it."""


@dataclass(frozen=True)
class ObserverConfig:
    name: str = "minmax"
    per_channel: bool = False
    symmetric: bool = False
    momentum: float = 0.01
    percentile: float = 99.99
    bins: int = 2048
    steps: int = 100

    def __post_init__(self) -> None:
        if self.name not in OBSERVER_NAMES:
            raise ObserverError(f"unknown observer {self.name!r}; valid names: {', '.join(OBSERVER_NAMES)}")
        for f in ("per_channel", "symmetric"):
            if not isinstance(getattr(self, f), bool):
                raise ObserverError(f"{f} must be True or False, found {getattr(self, f)!r}")
        if not 0.0 < float(self.momentum) <= 1.0:
            raise ObserverError(f"momentum must be in (0, 1], found {self.momentum!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ObserverError(f"percentile must be in (50, 100], found {self.percentile!r}")
        if not isinstance(self.bins, int) or not 16 <= self.bins <= 1 << 16:
            raise ObserverError(f"bins must be an integer in 16..65536, found {self.bins!r}")
        if not isinstance(self.steps, int) or not 2 <= self.steps <= 10_000:
            raise ObserverError(f"steps must be an integer in 2..10000, found {self.steps!r}")
        defaults = ObserverConfig.__dataclass_fields__
        for f in ("momentum", "percentile", "bins", "steps"):
            if f not in _FIELDS_USED[self.name] and getattr(self, f) != defaults[f].default:
                raise ObserverError(f"{f}={getattr(self, f)!r} is set but observer {self.name!r} does "
                                    f"not use it (it reads: {', '.join(_FIELDS_USED[self.name]) or 'none'})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObserverConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ObserverError(f"unknown ObserverConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def as_config(observer: "str | ObserverConfig") -> ObserverConfig:
    if isinstance(observer, ObserverConfig):
        return observer
    if isinstance(observer, str):
        return ObserverConfig(name=observer)
    raise ObserverError(f"an observer is a name ({', '.join(OBSERVER_NAMES)}) or an ObserverConfig, "
                        f"found {type(observer).__name__}")


class Observer:
    """Base: input checks, symmetric ranges, JSON state. Subclasses set ``name`` and the hooks."""

    name = ""

    def __init__(self, config: ObserverConfig | None = None) -> None:
        config = config or ObserverConfig(name=self.name)
        if config.name != self.name:
            raise ObserverError(f"{type(self).__name__} takes an {self.name!r} config, found {config.name!r}")
        self.config = config
        self.channels: int | None = None

    def update(self, x: torch.Tensor) -> None:
        self._observe(self._rows(x))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels is None:
            raise ObserverError(f"observer {self.name!r} has seen no values yet; call update(x) first")
        lo, hi = (t.float() for t in self._range())
        if self.config.symmetric:
            a = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -a, a
        return (lo, hi) if self.config.per_channel else (lo.reshape(()), hi.reshape(()))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Any shape -> (rows, C): C is the last dimension per channel, else 1."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0 or x.dim() == 0:
            raise ObserverError(f"observer {self.name!r} takes a non-empty floating tensor with at "
                                f"least one dimension, found {_describe(x)}")
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1]) if self.config.per_channel else x.reshape(-1, 1)
        if not torch.isfinite(rows).all():
            raise ObserverError(f"observer {self.name!r}: the input holds NaN or inf")
        if self.channels is not None and rows.shape[1] != self.channels:
            raise ObserverError(f"observer {self.name!r} saw {self.channels} channels before, "
                                f"found {rows.shape[1]} (shape {tuple(x.shape)})")
        self.channels = rows.shape[1]
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"version": OBSERVER_VERSION, "config": self.config.to_dict(), "channels": self.channels,
                "state": None if self.channels is None else self._state()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Observer":
        if d.get("version") != OBSERVER_VERSION:
            raise ObserverError(f"observer state version {d.get('version')!r}, this lowbit reads "
                                f"{OBSERVER_VERSION}")
        config = ObserverConfig.from_dict(d["config"])
        obs = (OBSERVERS[config.name] if cls is Observer else cls)(config)
        if d["state"] is not None:
            obs.channels = int(d["channels"])
            obs._load(d["state"])
        return obs

    def _observe(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, s: dict[str, Any]) -> None:
        raise NotImplementedError


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self, config: ObserverConfig | None = None) -> None:
        super().__init__(config)
        self.lo: torch.Tensor | None = None  # (C,) float32
        self.hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=0).float(), rows.amax(dim=0).float()
        if self.lo is not None:
            lo, hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.lo, self.hi = lo, hi

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def _state(self) -> dict[str, Any]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}

    def _load(self, s: dict[str, Any]) -> None:
        self.lo = torch.tensor(s["lo"], dtype=torch.float32)
        self.hi = torch.tensor(s["hi"], dtype=torch.float32)


class EMAObserver(MinMaxObserver):
    """Moving-average min-max: ``r <- r + momentum * (batch extreme - r)``, the first batch as is."""

    name = "ema"

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=0).float(), rows.amax(dim=0).float()
        if self.lo is not None:
            c = self.config.momentum
            lo, hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)
        self.lo, self.hi = lo, hi


class _HistogramBased(Observer):
    """Observers that keep a `StreamingHistogram` (of ``|x|`` when symmetric)."""

    def __init__(self, config: ObserverConfig | None = None) -> None:
        super().__init__(config)
        self.hist = StreamingHistogram(self.config.bins)

    def _observe(self, rows: torch.Tensor) -> None:
        self.hist.update(rows.abs() if self.config.symmetric else rows)

    def _state(self) -> dict[str, Any]:
        return self.hist.state()

    def _load(self, s: dict[str, Any]) -> None:
        self.hist.load_state(s)

    def _errors(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Int8 round-trip error of candidate ranges (C, K) on the histogram -> (C, K)."""
        if self.config.symmetric:  # a histogram of |x|: the symmetric grid treats -v as v
            lo = -hi
        spec = int8_spec(self.config.symmetric)
        return weighted_error(self.hist.centers(), self.hist.counts, lo, hi, spec)

    def _best(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate (C, K) with the least error per channel (the first on ties)."""
        k = self._errors(lo, hi).argmin(dim=1, keepdim=True)  # (C, 1)
        return lo.gather(1, k).squeeze(1), hi.gather(1, k).squeeze(1)


class PercentileObserver(_HistogramBased):
    name = "percentile"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.config.percentile / 100.0
        if self.config.symmetric:
            a = self.hist.quantile(p)
            return -a, a
        return self.hist.quantile(1.0 - p), self.hist.quantile(p)


class MSEObserver(_HistogramBased):
    name = "mse"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = 1.0 - MSE_MAX_SHRINK * torch.arange(self.config.steps, dtype=torch.float64) / self.config.steps
        lo = self.hist.lo.unsqueeze(1) * f  # (C, steps)
        hi = self.hist.hi.unsqueeze(1) * f
        return self._best(lo, hi)


class HistogramObserver(_HistogramBased):
    name = "histogram"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._best(*self._candidates())

    def _candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact min-max range, then ranges over bin edges walking inwards: (C, steps) each."""
        h = self.hist
        move = max(1, math.ceil(h.bins * HISTOGRAM_MAX_CLIP / (self.config.steps - 1)))
        # (C, bins + 1): cum[:, j] is the mass below edge j
        cum = torch.nn.functional.pad(h.counts.cumsum(dim=1), (1, 0))
        edges = h.edges()  # (C, bins + 1)
        first = torch.zeros_like(h.start)  # kept bins: [first, last)
        last = torch.full_like(h.start, h.bins)
        los, his = [h.lo], [h.hi]
        for _ in range(self.config.steps - 1):
            nf = torch.minimum(first + move, last - 1)
            nl = torch.maximum(last - move, first + 1)
            mass_lo = cum.gather(1, nf[:, None]) - cum.gather(1, first[:, None])
            mass_hi = cum.gather(1, last[:, None]) - cum.gather(1, nl[:, None])
            far_lo = edges.gather(1, first[:, None]).abs() >= edges.gather(1, last[:, None]).abs()
            take_lo = ((mass_lo < mass_hi) | ((mass_lo == mass_hi) & far_lo)).squeeze(1)
            if self.config.symmetric:  # |x| >= 0: only the top end moves
                take_lo = torch.zeros_like(take_lo)
            first, last = torch.where(take_lo, nf, first), torch.where(take_lo, last, nl)
            los.append(torch.maximum(edges.gather(1, first[:, None]).squeeze(1), h.lo))
            his.append(torch.minimum(edges.gather(1, last[:, None]).squeeze(1), h.hi))
        return torch.stack(los, dim=1), torch.stack(his, dim=1)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver, "ema": EMAObserver, "percentile": PercentileObserver,
    "mse": MSEObserver, "histogram": HistogramObserver,
}


def make_observer(observer: "str | ObserverConfig") -> Observer:
    """A fresh observer from a name or a config."""
    config = as_config(observer)
    return OBSERVERS[config.name](config)


def observer_from_dict(d: dict[str, Any]) -> Observer:
    """The inverse of ``Observer.to_dict`` for any observer."""
    return Observer.from_dict(d)
