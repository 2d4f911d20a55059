"""A DLRM-style CTR model (Naumov et al. 2019, "Deep Learning Recommendation Model for
Personalization and Recommendation Systems", arXiv 1906.00091): one embedding bag per sparse
feature, a bottom MLP for the dense features, pairwise dot products of all the vectors, a top MLP.

The bags are ``torch.nn.EmbeddingBag`` while training and `lowbit.tables.TableEmbeddingBag` when
served from table stores; `DLRM(config, bags=...)` builds either (no module surgery).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import LowbitError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class CTRConfig:
    """Architecture: sparse features (name, rows, mode), dense width, embedding dim, MLP widths."""

    sparse: tuple  # ((name, rows, mode), ...) in the order the model concatenates them
    dense: int = 3
    dim: int = 64
    bottom: tuple = (64,)
    top: tuple = (64,)
    dense_name: str = "dense"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse", tuple(tuple(s) for s in self.sparse))
        object.__setattr__(self, "bottom", tuple(self.bottom))
        object.__setattr__(self, "top", tuple(self.top))
        names = [s[0] for s in self.sparse]
        if not names or len(set(names)) != len(names) or self.dense_name in names:
            raise LowbitError(f"sparse feature names must be unique, non-empty and differ from "
                              f"{self.dense_name!r}; found {names}")
        for name, rows, mode in self.sparse:
            if not (isinstance(rows, int) and rows > 0) or mode not in ("sum", "mean"):
                raise LowbitError(f"feature {name!r}: rows must be a positive int and mode 'sum' or "
                                  f"'mean'; found rows={rows!r}, mode={mode!r}")
        if self.dense < 1 or self.dim < 1 or (self.bottom and self.bottom[-1] != self.dim):
            raise LowbitError(f"dense ({self.dense}) and dim ({self.dim}) must be >= 1 and the bottom "
                              f"MLP must end at dim; found bottom={self.bottom}")

    @property
    def names(self) -> list[str]:
        return [s[0] for s in self.sparse]

    def rows(self, name: str) -> int:
        return dict((s[0], s[1]) for s in self.sparse)[name]

    def to_json(self) -> dict:
        return {"config_version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict) -> "CTRConfig":
        if doc.get("config_version") != CONFIG_VERSION:
            raise LowbitError(f"CTR config version {doc.get('config_version')!r}; this lowbit reads {CONFIG_VERSION}")
        fields = {k: v for k, v in doc.items() if k != "config_version"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise LowbitError(f"CTR config: unknown field(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**fields)


def _mlp(widths: list[int], last_relu: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if last_relu or i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class DLRM(torch.nn.Module):
    """``forward(sparse, dense)`` -> logits (B,). ``sparse``: name -> (keys (n_keys,), offsets (B,))."""

    def __init__(self, config: CTRConfig, bags: dict | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        if bags is None:
            bags = {}
            for name, rows, mode in config.sparse:
                bag = torch.nn.EmbeddingBag(rows, config.dim, mode=mode)
                with torch.no_grad():
                    bag.weight.normal_(0.0, 0.05, generator=generator)
                bags[name] = bag
        if sorted(bags) != sorted(config.names):
            raise LowbitError(f"bags for {sorted(bags)}; the config names {sorted(config.names)}")
        self.bags = torch.nn.ModuleDict({n: bags[n] for n in config.names})
        self.bottom = _mlp([config.dense, *config.bottom], last_relu=True)
        n_vec = len(config.names) + 1
        pairs = n_vec * (n_vec - 1) // 2
        self.top = _mlp([config.dim + pairs, *config.top, 1], last_relu=False)
        self.register_buffer("_pairs", torch.triu_indices(n_vec, n_vec, offset=1), persistent=False)
        if generator is not None:
            self._init_dense(generator)

    def _init_dense(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for m in [*self.bottom, *self.top]:
                if isinstance(m, torch.nn.Linear):
                    bound = 1.0 / m.in_features ** 0.5
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.zero_()

    def embed(self, sparse: dict) -> tuple[list[torch.Tensor], dict]:
        """The bag vectors in config order, and the table version that answered each (served bags)."""
        vecs, versions = [], {}
        for name, bag in self.bags.items():
            keys, offsets = (torch.as_tensor(x, dtype=torch.int64) for x in sparse[name])
            if hasattr(bag, "forward_versioned"):
                v, versions[name] = bag.forward_versioned(keys, offsets)
            else:
                v = bag(keys, offsets)
            vecs.append(v)
        return vecs, versions

    def head(self, vecs: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)  # (B, dim)
        z = torch.stack([x, *vecs], dim=1)  # (B, n_vec, dim)
        dots = torch.bmm(z, z.transpose(1, 2))  # (B, n_vec, n_vec)
        inter = dots[:, self._pairs[0], self._pairs[1]]  # (B, pairs)
        return self.top(torch.cat([x, inter], dim=1)).squeeze(1)  # (B,)

    def forward(self, sparse: dict, dense) -> torch.Tensor:
        return self.head(self.embed(sparse)[0], torch.as_tensor(dense, dtype=torch.float32))

    def predict_versioned(self, sparse: dict, dense) -> tuple[np.ndarray, dict]:
        """Probabilities (B,) and the table versions that answered."""
        with torch.inference_mode():
            vecs, versions = self.embed(sparse)
            logits = self.head(vecs, torch.as_tensor(dense, dtype=torch.float32))
        return torch.sigmoid(logits).numpy(), versions


def config_json(config: CTRConfig) -> str:
    return json.dumps(config.to_json(), sort_keys=True)
