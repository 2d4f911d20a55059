"""Redis store against a real redis-server and a real 3-node Redis Cluster: push, lookup, missing
keys, versions switched atomically under concurrent readers, old versions collected, and a Redis
that goes away (SIGSTOP) and comes back (SIGCONT)."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from lowbit.tables import TableError, build, open_table
from lowbit.tables.store_redis import StoreUnavailable, collect_retired, connect, push

ROWS, DIM = 2000, 16
OUTAGE_TIMEOUT_S = 0.5  # client socket timeout used in the outage test
OUTAGE_BOUND_S = 5.0  # an unreachable Redis must fail a lookup within this


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("t")
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-2 ** 62, 2 ** 62, ROWS + 50))[:ROWS]
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    (d / "x.tsv").write_text("".join(f"{k}\t{','.join(map(str, r))}\n" for k, r in zip(keys, x)))
    build(d / "x.tsv", d / "t", bits=4, progress=False, shards=2)
    return open_table(d / "t")


def constant_table(tmp_path, value: float, rows: int = 500):
    np.save(tmp_path / f"c{value}.npy", np.full((rows, DIM), value, np.float32))
    build(tmp_path / f"c{value}.npy", tmp_path / f"c{value}", bits=8, progress=False)
    return tmp_path / f"c{value}"


def test_push_and_lookup_match_local(redis_server, table):
    url = redis_server.url + "?name=emb"
    v = push(table, url)
    remote = open_table(url)
    keys = table.keys()[[0, 7, 1999, 7]]
    assert remote.version() == v and remote.dim == DIM
    assert np.array_equal(remote.lookup(keys), table.lookup(keys))
    assert np.array_equal(remote.lookup(keys, pipelined=False), table.lookup(keys))


def test_missing_keys(redis_server, table):
    push(table, redis_server.url, "emb_missing")
    remote = open_table(redis_server.url + "?name=emb_missing")
    absent = int(table.keys()[5]) + 1
    with pytest.raises(TableError, match=f"1 key\\(s\\) not in the table: {absent}"):
        remote.lookup([table.keys()[0], absent])
    assert np.array_equal(remote.lookup([absent], on_missing="zeros"), np.zeros((1, DIM), np.float32))
    with pytest.raises(TableError, match="no table 'nope'"):
        open_table(redis_server.url + "?name=nope").lookup([1])


def test_readers_never_see_a_mix_of_versions(redis_server, tmp_path):
    url = redis_server.url + "?name=swap"
    tables = [constant_table(tmp_path, float(v)) for v in (1, 2, 3, 4)]
    push(tables[0], url, grace_s=0)
    seen, bad, stop_flag = set(), [], threading.Event()

    def reader():
        t = open_table(url)
        keys = np.arange(0, 500, 5)  # 100 keys, every bucket
        for _ in range(5000):
            if stop_flag.is_set():
                return
            rows = t.lookup(keys)
            vals = set(np.unique(rows).tolist())
            seen.update(vals)
            if len(vals) != 1:
                bad.append(vals)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for th in threads:
        th.start()
    for path in tables[1:]:
        push(path, url, grace_s=0.2)
        time.sleep(0.05)
    stop_flag.set()
    for th in threads:
        th.join(timeout=30)
    assert not bad and seen >= {4.0}
    client = connect(url)
    time.sleep(0.25)
    collect_retired(client, "swap", grace_s=0.2)
    live = sorted(k.decode() for k in client.scan_iter("lowbit:{swap:*"))
    assert live == [f"lowbit:{{swap:4:0}}:rows"]  # only the current version's rows are left


def test_store_outage_is_reported_and_lookups_resume(redis_server, table):
    url = redis_server.url + "?name=outage"
    push(table, url)
    remote = open_table(url, timeout_s=OUTAGE_TIMEOUT_S)
    keys = table.keys()[:100]
    want = remote.lookup(keys)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis unavailable for table 'outage'"):
            remote.lookup(keys)
        assert time.monotonic() - t0 < OUTAGE_BOUND_S
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert np.array_equal(remote.lookup(keys), want)


def test_unreachable_url_is_named():
    pytest.importorskip("redis", reason="redis-py missing: pip install -e '.[test]'")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        open_table(f"redis://127.0.0.1:{port}/0?name=x", timeout_s=0.5).lookup([1])


def test_cluster_push_and_lookup(redis_cluster, table):
    url = f"redis+cluster://127.0.0.1:{redis_cluster[0].port}?name=emb"
    v = push(table, url)
    remote = open_table(url)
    keys = table.keys()[::7]
    assert remote.version() == v
    assert np.array_equal(remote.lookup(keys), table.lookup(keys))
    # the rows really are spread: every node holds some buckets
    held = [int(s.cli("DBSIZE").strip()) for s in redis_cluster]
    assert all(h > 0 for h in held), held


def test_a_shared_table_answers_while_another_thread_caches_an_older_version(redis_server, tmp_path):
    # a server's threads share one table: a thread still on the old version caches that version's
    # metadata in the middle of another thread's lookup; the lookup must not take it for its own
    url = redis_server.url + "?name=shared"
    v1 = push(constant_table(tmp_path, 1.0), url, grace_s=60)  # v1 stays readable
    t = open_table(url)
    keys = np.arange(0, 500, 5)
    assert np.all(t.lookup(keys) == 1.0)
    v2 = push(constant_table(tmp_path, 2.0), url, grace_s=60)
    fetch = t._fetch

    def racing_fetch(*args):
        t.meta(v1)  # the other thread
        return fetch(*args)

    t._fetch = racing_fetch
    rows, version = t.lookup_versioned(keys)
    assert version == v2 and np.all(rows == 2.0)
