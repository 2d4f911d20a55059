"""A served CTR model: the dense part saved with `lowbit.save`, the embedding layers saved as
*table references* (by name and URL, never by rows).

Folder layout (one lowbit format-2 artifact; ``ctr.json`` is a side file, so its sha256 is sealed
in the weights file's header and checked by `lowbit.load`)::

    DIR/model.safetensors    bottom and top MLP tensors (lowbit.save)
    DIR/ctr.json             {"ctr_format": 1, "model": CTRConfig.to_json(),
                              "tables": {feature: {"table": NAME, "url": URL}}}

A reference URL is a table folder (relative paths are relative to DIR) or a Redis URL
(``redis://host:port/db?name=NAME``). `rebind` points every reference at another store:
a folder ROOT (ROOT/NAME) or ``redis://host:port/db[?prefix=P]`` (Redis table ``P`` + NAME).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

from .. import io, tables
from ..errors import LowbitError
from ..tables.format import TableError
from .model import DLRM, CTRConfig

CTR_FORMAT = 1
SIDE_NAME = "ctr.json"
REDIS_SCHEMES = ("redis", "rediss", "redis+cluster")


def is_redis(url: str) -> bool:
    return urlparse(str(url)).scheme in REDIS_SCHEMES


def rebind(refs: dict, store: str) -> dict:
    """Every reference pointed at ``store`` (a folder or a Redis URL), keeping table names."""
    if not is_redis(store):
        return {f: {"table": r["table"], "url": str(Path(store) / r["table"])} for f, r in refs.items()}
    u = urlparse(store)
    query = parse_qs(u.query)
    prefix = query.pop("prefix", [""])[0]
    if "name" in query:
        raise LowbitError(f"--tables {store}: name the store, not a table (use ?prefix=P, not ?name=)")
    out = {}
    for f, r in refs.items():
        q = urlencode({**{k: v[0] for k, v in query.items()}, "name": prefix + r["table"]})
        out[f] = {"table": r["table"], "url": urlunparse(u._replace(query=q))}
    return out


def open_tables(refs: dict, base: Path, timeout_s: float = 2.0) -> dict:
    """feature -> opened table (`LocalTable` or `RedisTable`)."""
    opened = {}
    for feature, ref in refs.items():
        url = ref["url"]
        try:
            if is_redis(url):
                opened[feature] = tables.open(url, timeout_s=timeout_s)
            else:
                path = Path(url) if Path(url).is_absolute() else Path(os.path.normpath(base / url))
                opened[feature] = tables.open(path)
        except (LowbitError, TableError) as exc:
            raise LowbitError(f"feature {feature!r}: table {ref['table']!r} at {url}: {exc}") from None
    return opened


def check_tables(config: CTRConfig, opened: dict) -> None:
    """Each table's dim is the model's; (local) row counts cover the feature's keys."""
    for feature, table in opened.items():
        rows = getattr(table, "rows", None)
        if table.dim != config.dim:
            raise LowbitError(f"feature {feature!r}: table {table!r} has dim {table.dim}, the model "
                              f"expects {config.dim}")
        if rows is not None and rows < config.rows(feature):
            raise LowbitError(f"feature {feature!r}: table {table!r} has {rows} rows, the model's keys "
                              f"go up to {config.rows(feature) - 1}")


def served_model(config: CTRConfig, opened: dict) -> DLRM:
    modes = {n: m for n, _, m in config.sparse}
    bags = {f: tables.TableEmbeddingBag(t, mode=modes[f]) for f, t in opened.items()}
    return DLRM(config, bags=bags)


def save_served(trained: DLRM, out, refs: dict) -> Path:
    """Save ``trained``'s dense part to ``out`` with table references ``refs`` (feature ->
    {"table", "url"}); the tables are opened once here so that a wrong reference fails now."""
    out = Path(out)
    config = trained.config
    if sorted(refs) != sorted(config.names):
        raise LowbitError(f"table references for {sorted(refs)}; the model has {sorted(config.names)}")
    opened = open_tables(refs, out)
    check_tables(config, opened)
    model = served_model(config, opened)
    dense = {k: v for k, v in trained.state_dict().items() if not k.startswith("bags.")}
    model.load_state_dict(dense, strict=True)
    doc = {"ctr_format": CTR_FORMAT, "model": config.to_json(), "tables": refs}
    with tempfile.TemporaryDirectory() as tmp:
        side = Path(tmp) / SIDE_NAME
        side.write_text(json.dumps(doc, indent=1, sort_keys=True))
        return io.save(model, out, side_files={SIDE_NAME: side})


def read_refs(folder) -> dict:
    folder = Path(folder)
    path = folder / SIDE_NAME
    if not path.is_file():
        raise LowbitError(f"{folder}: no {SIDE_NAME}; not a served CTR model (save it with save_served)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path}: not valid JSON ({exc})") from None
    if doc.get("ctr_format") != CTR_FORMAT:
        raise LowbitError(f"{path}: ctr_format {doc.get('ctr_format')!r}; this lowbit reads {CTR_FORMAT}")
    return doc


def load_served(folder, tables_url: str | None = None, timeout_s: float = 2.0) -> tuple[DLRM, dict]:
    """(model, references) of a served CTR model; ``tables_url`` rebinds its tables."""
    folder = Path(folder)
    io.read_file(io.weights_path(folder))  # checks the header, tensors and ctr.json's checksum first
    doc = read_refs(folder)
    config = CTRConfig.from_json(doc["model"])
    refs = rebind(doc["tables"], tables_url) if tables_url else doc["tables"]
    opened = open_tables(refs, folder, timeout_s)
    check_tables(config, opened)
    model = io.load(folder, model=served_model(config, opened))
    return model, refs
