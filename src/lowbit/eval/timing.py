"""Side-by-side timing: methods interleaved round by round, reported as median and min."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def cpu_name() -> str:
    """The CPU model, for benchmark headers ("unknown" where the OS does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    rounds: int


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 10, warmup: int = 1,
                budget_s: float | None = None) -> dict[str, Timing]:
    """Time each callable once per round, in turn, so machine noise hits all of them alike.

    The order rotates by one each round, so that each callable takes each place equally often:
    whatever a call leaves in the caches (a 384x384 fp32 weight fills most of a core's L2) is
    paid by the next, and a fixed order charged it to the same method every round (5 us of a
    120 us layer, measured here). Stops early (after at least 3 rounds) when ``budget_s``
    seconds have passed.
    """
    items = list(fns.items())
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        for r in range(rounds):
            shift = r % len(items)
            for name, fn in items[shift:] + items[:shift]:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
                break
    return {k: Timing(statistics.median(v), min(v), len(v)) for k, v in samples.items()}
