"""`lowbit serve` as users run it: two worker processes, concurrent clients, JSON log lines, and a
graceful SIGTERM (exit 0). Plus the sealed table references and `--tables` rebinding."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import as_sparse, redis_helpers, tiny_inputs

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
CONCURRENT = 8


def test_serve_two_workers_concurrent_clients_and_graceful_stop(served):
    from lowbit.ctr.served import load_served
    from lowbit.serve import Client
    _, folder = served
    port = redis_helpers.free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(folder), "--port", str(port),
                             "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with Client(url, timeout_s=2) as c:
            while True:
                try:
                    c.health()
                    break
                except Exception:  # noqa: BLE001  (not up yet)
                    assert proc.poll() is None and time.monotonic() < deadline, "lowbit serve did not start"
                    time.sleep(0.2)
        model, _ = load_served(folder)
        inputs = [tiny_inputs(5, seed=s) for s in range(CONCURRENT)]
        results: dict = {}

        def one(i):
            with Client(url) as c:
                results[i] = c.predict(inputs[i])
        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for i in range(CONCURRENT):
            want = model.predict_versioned(*as_sparse(inputs[i], model.config))[0]
            np.testing.assert_array_equal(results[i].astype(np.float32), want)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    assert proc.returncode == 0, err[-2000:]
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    other = [line for line in err.splitlines() if not line.startswith("{")]
    # every line is a JSON object, except Python's multiprocessing resource tracker's own note at exit
    assert all("resource_tracker" in line or "warnings.warn" in line for line in other), other
    requests = [r for r in logs if r.get("event") == "request" and r["path"] == "/predict"]
    assert len(requests) == CONCURRENT and all(r["status"] == 200 and r["batch"] == 5 for r in requests)
    assert len({r["pid"] for r in logs if r.get("event") == "loaded"}) == 2  # two workers loaded it


def test_references_are_sealed_and_rebindable(served, tmp_path):
    from lowbit.ctr.served import load_served, read_refs
    from lowbit.errors import FormatError, LowbitError
    model, folder = served
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder.parent / "tables", moved)
    with pytest.raises(LowbitError, match="table 'bags.(user|item|occupation|genre)'.*no manifest"):
        load_served(copy)  # its relative table URLs point at nothing here
    rebound, refs = load_served(copy, str(moved))
    assert refs["user"]["url"] == str(moved / "bags.user")
    inputs = tiny_inputs(3)
    original, _ = load_served(folder)
    np.testing.assert_array_equal(rebound.predict_versioned(*as_sparse(inputs, model.config))[0],
                                  original.predict_versioned(*as_sparse(inputs, model.config))[0])
    doc = read_refs(copy)
    doc["tables"]["user"]["url"] = "/somewhere/else"
    (copy / "ctr.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="side file 'ctr.json' does not match"):
        load_served(copy, str(moved))


def test_rebind_forms():
    from lowbit.ctr.served import rebind
    from lowbit.errors import LowbitError
    refs = {"user": {"table": "bags.user", "url": "../t/bags.user"}}
    assert rebind(refs, "redis://127.0.0.1:7000/2?prefix=b4-")["user"]["url"] == \
        "redis://127.0.0.1:7000/2?name=b4-bags.user"
    assert rebind(refs, "/srv/tables")["user"]["url"] == "/srv/tables/bags.user"
    with pytest.raises(LowbitError, match=r"use \?prefix=P, not \?name="):
        rebind(refs, "redis://127.0.0.1:7000/0?name=x")


GOLDEN_CTR_JSON = """{
 "ctr_format": 1,
 "model": {
  "bottom": [
   16,
   8
  ],
  "config_version": 1,
  "dense": 3,
  "dense_name": "dense",
  "dim": 8,
  "sparse": [
   [
    "user",
    60,
    "sum"
   ],
   [
    "item",
    40,
    "sum"
   ],
   [
    "occupation",
    6,
    "sum"
   ],
   [
    "genre",
    8,
    "mean"
   ]
  ],
  "top": [
   16
  ]
 },
 "tables": {
  "genre": {
   "table": "bags.genre",
   "url": "../tables/bags.genre"
  },
  "item": {
   "table": "bags.item",
   "url": "../tables/bags.item"
  },
  "occupation": {
   "table": "bags.occupation",
   "url": "../tables/bags.occupation"
  },
  "user": {
   "table": "bags.user",
   "url": "../tables/bags.user"
  }
 }
}"""


def test_ctr_json_golden_and_sealed(served):
    """The side file byte for byte (hand-written above), and its checksum in the weights header."""
    import hashlib

    from lowbit.io import read_header
    _, folder = served
    raw = (folder / "ctr.json").read_bytes()
    assert raw == GOLDEN_CTR_JSON.encode()
    assert read_header(folder)["files"] == {"ctr.json": hashlib.sha256(raw).hexdigest()}
