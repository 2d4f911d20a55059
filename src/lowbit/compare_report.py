"""What `lowbit.compare` returns: one row per scheme (and method), printable as a terminal table,
JSON (schema ``lowbit.compare``, version 1), Markdown, and a PNG plot (quality vs size on disk,
latency vs fp32 beside it; matplotlib, the ``plot`` extra).

JSON layout (version 1)::

    {"schema": "lowbit.compare", "schema_version": 1,
     "model": str, "task": str, "metric": str, "higher_is_better": bool,
     "cpu": str, "threads": int, "torch": str, "load_average": [1 min, 5 min, 15 min],
     "batches": [int, ...], "rounds": int, "notes": [str, ...],
     "rows": [{"label", "scheme", "method", "file_bytes", "size_ratio", "rss_mb", "peak_rss_mb",
               "latency": [{"batch", "median_ms", "min_ms", "rounds"}, ...],
               "quality": {metric: float, ...}, "delta": float, "drop": float,
               "flags": [str, ...], "paths": [str, ...]}, ...]}

``delta`` is the metric minus fp32's; ``drop`` is the quality lost (positive = worse, whichever
way the metric points). ``rss_mb``: resident memory the loaded model added in a fresh process;
``peak_rss_mb``: that process's peak (VmHWM) over its baseline. Either is null where no fresh
process could load the model (a plain nn.Module without a saved architecture).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .textable import text_table

SCHEMA = "lowbit.compare"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Latency:
    batch: int
    median_ms: float
    min_ms: float
    rounds: int


@dataclass(frozen=True)
class CompareRow:
    label: str
    scheme: str
    method: str
    file_bytes: int
    size_ratio: float
    rss_mb: float | None
    peak_rss_mb: float | None
    latency: tuple[Latency, ...]
    quality: dict
    delta: float
    drop: float
    flags: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def ms(self, batch: int) -> float | None:
        return next((t.median_ms for t in self.latency if t.batch == batch), None)


@dataclass(frozen=True)
class CompareReport:
    model: str
    task: str
    metric: str
    higher_is_better: bool
    cpu: str
    threads: int
    torch: str
    load_average: tuple[float, float, float]
    batches: tuple[int, ...]
    rounds: int
    rows: tuple[CompareRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def fp32(self) -> CompareRow:
        return self.rows[0]

    def header(self) -> str:
        load = self.load_average[0]
        busy = "loaded machine" if load >= 0.5 * max(self.threads, 1) else "quiet machine"
        return (f"lowbit compare: {self.model}; task {self.task} ({self.metric}, "
                f"{'higher' if self.higher_is_better else 'lower'} is better)\n"
                f"CPU: {self.cpu}; torch {self.torch}; {self.threads} thread(s); load average "
                f"{load:.1f} at start ({busy}); latency: median of {self.rounds} interleaved rounds "
                "(batch 1: 6x as many), fp32 in the same process; RSS: fresh process per row")

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        extra = sorted({k for r in self.rows for k in r.quality} - {self.metric})
        heads = ["scheme", "MB disk", "x fp32", "RSS MB"]
        heads += [f"b{b} ms (x fp32)" for b in self.batches] + [self.metric, "delta"] + extra
        rows = []
        for r in self.rows:
            cells = [r.label + (" *" if r.flags else ""), f"{r.file_bytes / 1e6:.1f}", f"{r.size_ratio:.3f}",
                     "-" if r.rss_mb is None else f"{r.rss_mb:.0f}"]
            for b in self.batches:
                ms, base = r.ms(b), self.fp32.ms(b)
                cells.append("-" if ms is None else f"{ms:.2f} ({ms / base:.2f})" if base else f"{ms:.2f}")
            cells += [f"{r.quality.get(self.metric, float('nan')):.4f}", f"{r.delta:+.4f}"]
            cells += [f"{r.quality.get(k, float('nan')):.5f}" for k in extra]
            rows.append(cells)
        return heads, rows

    def flag_lines(self) -> list[str]:
        return [f"* {r.label}: {f}" for r in self.rows for f in r.flags]

    def __str__(self) -> str:
        heads, rows = self._cells()
        table = text_table(heads, rows, [False] + [True] * (len(heads) - 1))
        return "\n".join([self.header(), table, *self.flag_lines(), *self.notes])

    def to_markdown(self) -> str:
        heads, rows = self._cells()
        lines = [f"| {' | '.join(heads)} |", "|" + "---|" * len(heads)]
        lines += [f"| {' | '.join(c)} |" for c in rows]
        head = self.header().replace("\n", "  \n")
        notes = [f"- {x}" for x in self.flag_lines() + list(self.notes)]
        return "\n".join([head, "", *lines, "", *notes]) + "\n"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text: str) -> "CompareReport":
        d = json.loads(text)
        if d.get("schema") != SCHEMA or d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"not a {SCHEMA} version {SCHEMA_VERSION} report: found schema "
                             f"{d.get('schema')!r} version {d.get('schema_version')!r}")
        rows = tuple(CompareRow(**{**r, "latency": tuple(Latency(**t) for t in r["latency"]),
                                   "flags": tuple(r["flags"]), "paths": tuple(r["paths"])})
                     for r in d["rows"])
        keep = {f.name for f in dataclasses.fields(cls)} - {"rows"}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keep}
        return cls(rows=rows, **fields)

    def plot(self, path: str | Path) -> Path:
        from .compare_plot import plot_report
        return plot_report(self, Path(path))


__all__ = ["CompareReport", "CompareRow", "Latency", "SCHEMA", "SCHEMA_VERSION"]
