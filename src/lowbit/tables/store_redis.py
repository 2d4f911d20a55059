"""Tables in Redis (one server or a Redis Cluster): versioned push with an atomic switch, and
pipelined lookups decoded on the client.

Key scheme (``REDIS_SCHEME`` 1) for a table ``NAME``; ``{...}`` is the Redis Cluster hash tag::

    lowbit:{NAME}:current        the live version number (the pointer readers follow)
    lowbit:{NAME}:next           version counter (INCR)
    lowbit:{NAME}:meta:V         JSON: dim, bits, scale_dtype, key_dtype, rows, record_bytes, buckets
    lowbit:{NAME}:retired        sorted set: retired version -> time it was retired
    lowbit:{NAME:V:B}:rows       hash, bucket B of version V: field = key as 8 little-endian bytes,
                                 value = the row's record (`tables.format`: scale | bias | codes)

A key's bucket is ``key mod buckets`` (on the key's 64-bit pattern). The pointer, counter, metadata
and retired set share one slot (one Lua script switches the pointer and retires the old version
atomically); a version's rows spread over ``buckets`` slots, so in a cluster they spread over nodes.

Push (Paddle Cube's double-buffered swap): write every row of version V with pipelining, check
the row count, then switch the pointer. Readers read the pointer, version V's metadata and the rows
in one pipeline; if the pointer moved since their cached version, or the metadata is not the one
they cached (a Redis restarted empty numbers its pushes from 1 again), they re-read. So a lookup
returns rows of a single version. A retired version is deleted by a later push once
``grace_s`` seconds have passed (readers in flight keep reading it until then).
A Redis that cannot be reached raises `StoreUnavailable` within about ``timeout_s`` seconds;
the next lookup reconnects.
"""
from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

import numpy as np

from .format import FORMAT_VERSION, Layout, TableError
from .quant import decode_records
from .store_local import LocalTable, _cast_keys, _fill_missing

REDIS_SCHEME = 1
DEFAULT_GRACE_S = 60.0
DEFAULT_TIMEOUT_S = 2.0
CLUSTER_BUCKETS = 16
PUSH_BATCH = 4096
MAX_VERSION_TRIES = 3
_SWITCH_LUA = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if old then redis.call('ZADD', KEYS[2], ARGV[2], old) end
return old
"""


class StoreUnavailable(TableError):
    """The store could not be reached in time; the message names it. Retry later."""


def _k(name: str, what: str) -> str:
    return f"lowbit:{{{name}}}:{what}"


def _rows_key(name: str, version: int, bucket: int) -> str:
    return f"lowbit:{{{name}:{version}:{bucket}}}:rows"


def parse_url(url: str) -> dict:
    """``redis://host:port/db?name=X`` or ``redis+cluster://host:port?name=X`` -> parts."""
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss", "redis+cluster"):
        raise TableError(f"{url}: expected redis://host:port/db?name=X or redis+cluster://host:port?name=X")
    q = parse_qs(u.query)
    db = int(u.path.strip("/") or 0) if u.scheme != "redis+cluster" else 0
    return {"cluster": u.scheme == "redis+cluster", "host": u.hostname or "127.0.0.1",
            "port": u.port or 6379, "db": db, "name": q.get("name", [None])[0],
            "ssl": u.scheme == "rediss", "where": f"{u.scheme}://{u.hostname}:{u.port or 6379}"}


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A redis-py client with bounded timeouts and one immediate reconnect attempt."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise TableError("Redis stores need redis-py: pip install 'lowbit[tables]'") from None
    p = parse_url(url)
    common = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
              "retry": Retry(NoBackoff(), 1)}
    try:
        if p["cluster"]:
            from redis.cluster import RedisCluster
            return RedisCluster(host=p["host"], port=p["port"], **common)
        return redis.Redis(host=p["host"], port=p["port"], db=p["db"], ssl=p["ssl"], **common)
    except _unavailable_errors() as exc:
        raise StoreUnavailable(f"{p['where']}: cannot reach Redis ({type(exc).__name__}: {exc})") from None


def _unavailable_errors() -> tuple:
    from redis import exceptions as e
    return (e.ConnectionError, e.TimeoutError, e.ClusterDownError, e.RedisClusterException,
            e.BusyLoadingError, ConnectionError, OSError)


def _key_bytes(k: np.ndarray) -> list[bytes]:
    raw = k.astype(k.dtype.newbyteorder("<"), copy=False).tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _buckets_of(k: np.ndarray, buckets: int) -> np.ndarray:
    return (k.view(np.uint64) % np.uint64(buckets)).astype(np.int64) if buckets > 1 else np.zeros(k.size, np.int64)


def push(table, url: str, name: str | None = None, *, buckets: int | None = None,
         grace_s: float = DEFAULT_GRACE_S, timeout_s: float = DEFAULT_TIMEOUT_S,
         batch: int = PUSH_BATCH) -> int:
    """Write ``table`` (a `LocalTable` or its folder) as a new version of ``name`` and switch readers
    to it atomically; returns the version. Versions retired over ``grace_s`` seconds ago are deleted."""
    table = table if isinstance(table, LocalTable) else LocalTable(table)
    p = parse_url(url)
    name = name or p["name"]
    if not name:
        raise TableError(f"{url}: name the table (--name or ?name=)")
    buckets = buckets or (CLUSTER_BUCKETS if p["cluster"] else 1)
    client = connect(url, timeout_s)
    try:
        version = int(client.incr(_k(name, "next")))
        meta = {"redis_scheme": REDIS_SCHEME, "format_version": FORMAT_VERSION, "dim": table.dim,
                "bits": table.layout.bits, "scale_dtype": table.layout.scale_dtype,
                "key_dtype": str(table.key_dtype), "rows": table.rows, "buckets": buckets,
                "record_bytes": table.layout.record_bytes, "pushed": time.time(),
                "source_sha256": table.manifest.get("source_sha256")}
        try:
            _write_rows(client, name, version, table, buckets, batch)
            client.set(_k(name, f"meta:{version}"), json.dumps(meta, sort_keys=True))
        except BaseException:
            _delete_version(client, name, version, buckets)  # never leave a half version behind
            raise
        client.eval(_SWITCH_LUA, 2, _k(name, "current"), _k(name, "retired"), version, time.time())
        collect_retired(client, name, grace_s)
        return version
    except _unavailable_errors() as exc:
        raise StoreUnavailable(f"{p['where']}: Redis went away during push of {name!r} "
                               f"({type(exc).__name__}: {exc}); readers still see the previous version") from None


def _write_rows(client, name: str, version: int, table: LocalTable, buckets: int, batch: int) -> None:
    for keys, records in table.iter_records(batch):
        fields, bucket = _key_bytes(keys), _buckets_of(keys, buckets)
        values = [r.tobytes() for r in records]  # one record per row
        pipe = client.pipeline(transaction=False)
        for b in np.unique(bucket):
            idx = np.flatnonzero(bucket == b)
            pipe.hset(_rows_key(name, version, int(b)), mapping={fields[i]: values[i] for i in idx})
        pipe.execute()
    pipe = client.pipeline(transaction=False)
    for b in range(buckets):
        pipe.hlen(_rows_key(name, version, b))
    stored = sum(pipe.execute())
    if stored != table.rows:
        raise TableError(f"push of {name!r} version {version}: Redis holds {stored} rows, expected "
                         f"{table.rows} (another writer or eviction?); the pointer was not switched")


def _delete_version(client, name: str, version: int, buckets: int) -> None:
    for b in range(buckets):
        client.unlink(_rows_key(name, version, b))
    client.unlink(_k(name, f"meta:{version}"))


def collect_retired(client, name: str, grace_s: float = DEFAULT_GRACE_S) -> list[int]:
    """Delete versions retired more than ``grace_s`` seconds ago; returns their numbers."""
    old = client.zrangebyscore(_k(name, "retired"), "-inf", time.time() - grace_s)
    done = []
    for v in (int(x) for x in old):
        raw = client.get(_k(name, f"meta:{v}"))
        buckets = json.loads(raw)["buckets"] if raw else 0
        _delete_version(client, name, v, buckets)
        client.zrem(_k(name, "retired"), v)
        done.append(v)
    return done


class RedisTable:
    """Lookups against a table pushed to Redis. Safe to share across threads (redis-py's pool)."""

    def __init__(self, client, name: str, where: str = "redis") -> None:
        self.client, self.name, self.where = client, name, where
        # (version, metadata, metadata as stored: a push's identity), replaced as one tuple: the
        # table is shared by a server's threads, and one thread must never compare its fetch
        # against metadata another thread cached for a different version
        self._cached: tuple[int, dict, bytes] | None = None
        self._version: int | None = None

    @classmethod
    def from_url(cls, url: str, name: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> "RedisTable":
        p = parse_url(url)
        name = name or p["name"]
        if not name:
            raise TableError(f"{url}: name the table (?name=X)")
        return cls(connect(url, timeout_s), name, p["where"])

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except _unavailable_errors() as exc:
            self._forget()  # a Redis that comes back may be a fresh one, with version numbers reused
            raise StoreUnavailable(f"{self.where}: Redis unavailable for table {self.name!r} "
                                   f"({type(exc).__name__}: {exc})") from None

    def _forget(self) -> None:
        self._cached, self._version = None, None

    def version(self) -> int:
        raw = self._call(self.client.get, _k(self.name, "current"))
        if raw is None:
            raise TableError(f"{self.where}: no table {self.name!r} (nothing pushed yet)")
        return int(raw)

    def meta(self, version: int | None = None) -> dict:
        return self._meta_of(self.version() if version is None else version)[0]

    def _meta_of(self, version: int) -> tuple[dict, bytes]:
        """(metadata, its stored bytes) of ``version``, cached for one version at a time."""
        cached = self._cached  # one read: another thread may replace it meanwhile
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        raw = self._call(self.client.get, _k(self.name, f"meta:{version}"))
        if raw is None:
            raise TableError(f"{self.where}: table {self.name!r} version {version} has no metadata")
        meta = json.loads(raw)
        self._cached = (version, meta, raw)
        return meta, raw

    @property
    def dim(self) -> int:
        return self.meta()["dim"]

    def lookup(self, keys, on_missing: str = "error", default=None, pipelined: bool = True) -> np.ndarray:
        """float32 (n, dim) rows, all from one version; missing keys as in `LocalTable.lookup`."""
        return self.lookup_versioned(keys, on_missing, default, pipelined)[0]

    def lookup_versioned(self, keys, on_missing: str = "error", default=None,
                         pipelined: bool = True) -> tuple[np.ndarray, int]:
        """`lookup` plus the version number that answered (a server reports it per request)."""
        version = self._version if self._version is not None else self.version()
        for _ in range(MAX_VERSION_TRIES):
            meta, stored = self._meta_of(version)
            current, raw, values = self._call(self._fetch, keys, version, meta, pipelined)
            if current == version and raw == stored:
                self._version = version
                return self._decode(keys, values, meta, on_missing, default), version
            if current is None:
                self._forget()
                raise TableError(f"{self.where}: no table {self.name!r} (pointer deleted)")
            if current == version:  # same number, another push (a fresh Redis numbers from 1 again)
                self._forget()
            version = current
        raise TableError(f"{self.where}: table {self.name!r} changed version {MAX_VERSION_TRIES} times "
                         "during one lookup; retry")

    def _fetch(self, keys, version: int, meta: dict, pipelined: bool):
        k = np.asarray(keys).reshape(-1)
        k = _cast_keys(k, np.dtype(meta["key_dtype"])) if k.dtype != meta["key_dtype"] else k
        fields, bucket = _key_bytes(k), _buckets_of(k, meta["buckets"])
        groups = [np.flatnonzero(bucket == b) for b in np.unique(bucket)] if meta["buckets"] > 1 else [None]
        c = self.client.pipeline(transaction=False) if pipelined else self.client
        out = [c.get(_k(self.name, "current")), c.get(_k(self.name, f"meta:{version}"))]
        for idx in groups:
            b = 0 if idx is None else int(bucket[idx[0]])
            out.append(c.hmget(_rows_key(self.name, version, b), fields if idx is None else [fields[i] for i in idx]))
        res = c.execute() if pipelined else out
        values: list = [None] * k.size
        for idx, vals in zip(groups, res[2:]):
            for i, v in zip(range(k.size) if idx is None else idx, vals):
                values[i] = v
        return (int(res[0]) if res[0] is not None else None), res[1], values

    def _decode(self, keys, values: list, meta: dict, on_missing: str, default) -> np.ndarray:
        layout = Layout(meta["dim"], meta["bits"], meta["scale_dtype"] or "float16")
        ok = np.fromiter((v is not None for v in values), bool, len(values))
        blank = bytes(layout.record_bytes)
        raw = b"".join(v if v is not None else blank for v in values)
        records = np.frombuffer(raw, np.uint8).reshape(len(values), layout.record_bytes)
        out = decode_records(records, layout)
        if not ok.all():
            out = np.array(out)  # writable
            _fill_missing(out, keys, ok, on_missing, default, layout.dim, f"{self.where} {self.name!r}")
        return out

    def __repr__(self) -> str:
        return f"RedisTable({self.where!r}, name={self.name!r})"
