"""`lowbit table build|inspect|lookup|push` through the real argument parser, and a Dask build
(a LocalCluster on loopback) equal byte for byte to the local build."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.cli import main
from lowbit.tables import build, open_table


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32))
    return d / "x.npy"


def test_cli_build_inspect_lookup(src, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["table", "build", str(src), str(out), "--bits", "4", "--range", "greedy", "--shards", "2",
                 "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "1000 rows x 32 at 4 bits in 2 shard(s)" in text and "x of fp32 rows" in text
    assert main(["table", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "range greedy" in text and text.count("ok\n") == 2
    assert main(["table", "lookup", str(out), "17", "999"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = open_table(out).lookup([17, 999])
    assert [ln.split("\t")[0] for ln in lines] == ["17", "999"]
    assert np.allclose(np.array(lines[0].split("\t")[1].split(","), np.float32), want[0], atol=1e-4)
    assert main(["table", "lookup", str(out), "1000"]) == 2
    assert "not in the table: 1000" in capsys.readouterr().err


def test_cli_push_then_lookup_by_url(src, tmp_path, capsys, redis_server):
    out = tmp_path / "t"
    assert main(["table", "build", str(src), str(out), "--bits", "8", "--scale-dtype", "fp32"]) == 0
    assert main(["table", "push", str(out), redis_server.url, "--name", "cli_emb"]) == 0
    assert "as version 1 of cli_emb" in capsys.readouterr().out
    assert main(["table", "lookup", redis_server.url + "?name=cli_emb", "5"]) == 0
    assert capsys.readouterr().out.startswith("5\t")


def test_dask_build_equals_local_build_byte_for_byte(src, tmp_path):
    distributed = pytest.importorskip("distributed", reason="dask.distributed missing: pip install -e '.[test]'")
    build(src, tmp_path / "local", bits=4, shards=3, workers=0, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        address = cluster.scheduler_address  # tcp://127.0.0.1:PORT
        build(src, tmp_path / "dask", bits=4, shards=3, engine="dask://" + address.split("://")[1],
              progress=False)
    for i in range(3):
        name = f"shard-{i:05d}.lbt"
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()
    docs = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("local", "dask")]
    for doc in docs:
        doc.pop("created")
    assert docs[0] == docs[1]
