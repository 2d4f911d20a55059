"""Sentence embeddings and the WordSim-353 word-similarity benchmark."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def sentence_embeddings(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Attention-masked mean of last_hidden_state, L2-normalised (the all-MiniLM-L6-v2 recipe)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[i:i + batch_size]), padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1))
    return torch.cat(out)


def wordsim353_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        raise FileNotFoundError("WordSim-353 ships with gensim: pip install gensim")
    path = Path(spec.origin).parent / "test" / "test_data" / "wordsim353.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed gensim")
    return path


def read_wordsim353(path: Path | None = None) -> list[tuple[str, str, float]]:
    """(word1, word2, human score) for each of the 353 pairs."""
    pairs = []
    for line in (path or wordsim353_path()).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        w1, w2, score = line.split("\t")[:3]
        pairs.append((w1, w2, float(score)))
    return pairs


def spearman(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(list(map(float, a)), list(map(float, b))).statistic)


def wordsim_spearman(model, tokenizer, pairs: list[tuple[str, str, float]]) -> float:
    words = sorted({w for p in pairs for w in p[:2]})
    emb = dict(zip(words, sentence_embeddings(model, tokenizer, words)))
    cos = [float(emb[w1] @ emb[w2]) for w1, w2, _ in pairs]
    return spearman(cos, [s for *_, s in pairs])
