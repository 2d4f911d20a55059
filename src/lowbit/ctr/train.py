"""Training and scoring the CTR model in process (the reference the served numbers are checked
against), and ROC AUC."""
from __future__ import annotations

import numpy as np
import torch

from .data import Split
from .model import DLRM, CTRConfig

EPOCHS = 2
BATCH = 256
LR = 2e-3
SEED = 0


def config_for(sizes: dict, dim: int = 64) -> CTRConfig:
    modes = {"genre": "mean"}
    sparse = tuple((n, int(r), modes.get(n, "sum")) for n, r in sizes.items())
    return CTRConfig(sparse=sparse, dense=3, dim=dim, bottom=(64, dim), top=(64,))


def batches(split: Split, size: int, order: np.ndarray | None = None):
    """(sparse, dense, label) batches of ``split`` in ``order`` (default: as stored)."""
    order = np.arange(len(split)) if order is None else order
    for a in range(0, len(order), size):
        part = split.rows(order[a:a + size]) if order is not None else split
        yield part.sparse, torch.from_numpy(part.dense), torch.from_numpy(part.label)


def train(train_split: Split, sizes: dict, epochs: int = EPOCHS, seed: int = SEED, dim: int = 64,
          log=None) -> DLRM:
    """Adam on binary cross-entropy; shuffles with a numpy Generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    model = DLRM(config_for(sizes, dim), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    rng = np.random.default_rng(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for sparse, dense, label in batches(train_split, BATCH, rng.permutation(len(train_split))):
            opt.zero_grad()
            loss = loss_fn(model(sparse, dense), label)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(label), n + len(label)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / n:.4f}")
    return model.eval()


def predict(model: DLRM, split: Split, size: int = 4096) -> np.ndarray:
    """Probabilities (n,) in process."""
    out = []
    with torch.inference_mode():
        for sparse, dense, _ in batches(split, size):
            out.append(torch.sigmoid(model(sparse, dense)).numpy())
    return np.concatenate(out)


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score of a positive > score of a negative), ties
    counted half (average ranks)."""
    label = np.asarray(label).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; found {n_pos} positives and {n_neg} negatives")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
