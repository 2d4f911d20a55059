"""`IPQConfig`: which layer groups iPQ quantizes, in which order, with which codebooks.

Iterative product quantization (Stock et al., "And the Bit Goes Down", arXiv 1907.05686; Fan,
Stock et al., arXiv 2004.07320) quantizes a network stage by stage (e.g. ffn -> emb -> attn),
finetuning the centroids of the quantized layers in between. Each stage is a `LayerGroup`: targets
and ignores in the recipes' grammar (exact module name | class name | ``re:<regex>`` matched against
the whole name), a block size and a number of centroids.

YAML (``IPQConfig.from_yaml``) and JSON (``to_json`` / ``from_json``) share one form::

    version: 1
    seed: 0            # seeds the k-means generator (stage i, layer j: see `layer_seed`)
    n_iter: 20         # k-means iterations
    init: kmeans++     # or random
    tol: null          # stop k-means earlier when the error improves by less (relative)
    groups:
      - name: ffn
        targets: ["re:.*\\.(intermediate|output)\\.dense"]
        ignore: []
        block_size: 8
        n_centroids: 256
        centroid_dtype: float16
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .primitives.codebook import CENTROID_DTYPES, KMEANS_INITS, MAX_CENTROIDS
from .errors import LowbitError

IPQ_CONFIG_VERSION = 1


class IPQConfigError(LowbitError):
    """An iPQ configuration lowbit cannot accept; the message names the field and valid forms."""


def _names(x: Any, what: str) -> tuple[str, ...]:
    """A single name is a one-element tuple, never a tuple of its characters."""
    names = (x,) if isinstance(x, str) else tuple(x)
    for t in names:
        if not isinstance(t, str) or not t:
            raise IPQConfigError(f"{what}: every target must be a non-empty string (exact name, "
                                 f"class name or 're:<regex>'), found {t!r}")
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as exc:
                raise IPQConfigError(f"{what}: bad regex in target {t!r}: {exc}") from None
    return names


def _unknown(d: dict, cls: type, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - known
    if extra:
        raise IPQConfigError(f"{what}: unknown fields {sorted(extra)}; valid: {sorted(known)}")


@dataclass(frozen=True)
class LayerGroup:
    """One iPQ stage: the layers it takes and their codebook shape."""

    name: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    block_size: int = 8
    n_centroids: int = 256
    centroid_dtype: str = "float16"

    def __post_init__(self) -> None:
        what = f"group {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise IPQConfigError(f"a group needs a non-empty name, found {self.name!r}")
        object.__setattr__(self, "targets", _names(self.targets, what))
        object.__setattr__(self, "ignore", _names(self.ignore, what))
        if not self.targets:
            raise IPQConfigError(f"{what}: needs at least one target")
        if type(self.block_size) is not int or self.block_size < 1:
            raise IPQConfigError(f"{what}: block_size must be a positive integer, found {self.block_size!r}")
        if type(self.n_centroids) is not int or not 2 <= self.n_centroids <= MAX_CENTROIDS:
            raise IPQConfigError(f"{what}: n_centroids must be an integer in 2..{MAX_CENTROIDS}, "
                                 f"found {self.n_centroids!r}")
        if self.centroid_dtype not in CENTROID_DTYPES:
            raise IPQConfigError(f"{what}: centroid_dtype must be one of {tuple(CENTROID_DTYPES)}, "
                                 f"found {self.centroid_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerGroup":
        if not isinstance(d, dict):
            raise IPQConfigError(f"a group must be a mapping, found {type(d).__name__}")
        _unknown(d, cls, f"group {d.get('name')!r}")
        if "name" not in d or "targets" not in d:
            raise IPQConfigError(f"a group needs 'name' and 'targets', found keys {sorted(d)}")
        return cls(**d)


@dataclass(frozen=True)
class IPQConfig:
    """Stages in order, plus the k-means settings shared by all of them."""

    groups: tuple[LayerGroup, ...]
    seed: int = 0
    n_iter: int = 20
    init: str = "kmeans++"
    tol: float | None = None
    version: int = IPQ_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.version != IPQ_CONFIG_VERSION:
            raise IPQConfigError(f"config version {self.version!r} is not supported; this lowbit "
                                 f"reads version {IPQ_CONFIG_VERSION}")
        if not self.groups or not all(isinstance(g, LayerGroup) for g in self.groups):
            raise IPQConfigError("groups must be a non-empty sequence of LayerGroup")
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise IPQConfigError(f"group names must be unique, found duplicates {dup}")
        if type(self.seed) is not int or self.seed < 0:
            raise IPQConfigError(f"seed must be a non-negative integer, found {self.seed!r}")
        if type(self.n_iter) is not int or self.n_iter < 0:
            raise IPQConfigError(f"n_iter must be a non-negative integer, found {self.n_iter!r}")
        if self.init not in KMEANS_INITS:
            raise IPQConfigError(f"init must be one of {KMEANS_INITS}, found {self.init!r}")
        if self.tol is not None and (not isinstance(self.tol, (int, float)) or not self.tol >= 0):
            raise IPQConfigError(f"tol must be null or a number >= 0, found {self.tol!r}")

    def layer_seed(self, stage: int, layer: int) -> int:
        """The k-means seed of the ``layer``-th layer (in module order) of stage ``stage``:
        independent of which other stages run, reproducible from the config alone."""
        return self.seed * 1_000_003 + stage * 10_007 + layer

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "seed": self.seed, "n_iter": self.n_iter,
                "init": self.init, "tol": self.tol, "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IPQConfig":
        if not isinstance(d, dict):
            raise IPQConfigError(f"an iPQ config must be a mapping, found {type(d).__name__}")
        known = {"version", "seed", "n_iter", "init", "tol", "groups"}
        extra = set(d) - known
        if extra:
            raise IPQConfigError(f"unknown fields {sorted(extra)}; valid: {sorted(known)}")
        if "groups" not in d or not isinstance(d["groups"], list):
            raise IPQConfigError("an iPQ config needs 'groups': a list of stages")
        rest = {k: v for k, v in d.items() if k != "groups"}
        return cls(tuple(LayerGroup.from_dict(g) for g in d["groups"]), **rest)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IPQConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, source: "str | Path") -> "IPQConfig":
        """From a YAML file path, or YAML text (a string containing a newline or ':')."""
        import yaml  # pyyaml: a declared dependency, imported only here

        text = source
        if isinstance(source, Path) or ("\n" not in source and ":" not in source):
            path = Path(source)
            if not path.is_file():
                raise IPQConfigError(f"iPQ config file {str(path)!r} does not exist")
            text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise IPQConfigError(f"iPQ config is not valid YAML: {exc}") from None
        return cls.from_dict(data)
