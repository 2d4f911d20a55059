"""Embedding tables: row-wise quantized table folders, a parallel build, and lookup from a local
folder, Redis or a Redis Cluster. Nothing happens at import; Redis and Dask load only when used.

    lowbit.tables.build("emb.npy", "OUT", bits=4)
    table = lowbit.tables.open("OUT")               # or "redis://host:port/0?name=user_emb"
    rows = table.lookup(np.array([17, 42, 99]))     # float32 (3, dim)
"""
from __future__ import annotations

from .bag import TableEmbeddingBag
from .build import build
from .export import export
from .format import FORMAT_VERSION, Layout, TableError
from .store_local import LocalTable


def open(location, **kwargs):  # noqa: A001  (the public name the issue asks for)
    """A folder path -> `LocalTable`; ``redis://host:port/db?name=X`` or
    ``redis+cluster://host:port?name=X`` -> `RedisTable`."""
    text = str(location)
    if text.startswith(("redis://", "rediss://", "redis+cluster://")):
        from .store_redis import RedisTable
        return RedisTable.from_url(text, **kwargs)
    return LocalTable(location, **kwargs)


open_table = open



def push(table, url: str, name: str | None = None, **kwargs) -> int:
    """Push a table folder to Redis as a new version; see `store_redis.push`."""
    from .store_redis import push as _push
    return _push(table, url, name, **kwargs)


__all__ = ["FORMAT_VERSION", "Layout", "LocalTable", "TableEmbeddingBag", "TableError", "build", "export",
           "open", "open_table", "push"]
