"""The service over tables in a real redis-server: a new version pushed while clients send requests
switches atomically (every answer is wholly one version's, new requests get the new one), and a
Redis that stops (SIGSTOP) or dies gives 503s within a bound, then serving resumes without restart."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from serve_helpers import as_sparse, export_served, redis_helpers, running, tiny_inputs, tiny_model

STORE_TIMEOUT_S = 0.3  # Redis socket timeout given to the service
FAULT_BOUND_S = 3.0  # a request against a stopped Redis must be answered (503) within this
CLIENTS, MAX_REQUESTS_EACH = 4, 500  # traffic during the version switch (bounded in count)
TRAFFIC_WAIT_S = 20.0  # and in time


@pytest.fixture
def redis(tmp_path):
    redis_helpers.need_redis()
    server = redis_helpers.start_server(tmp_path)
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
        redis_helpers.stop(server)


def push_all(folder, url: str, prefix: str) -> dict:
    from lowbit import tables
    return {f.name: tables.push(f, url, name=prefix + f.name) for f in sorted((folder / "tables").iterdir())}


def serve_from_redis(model_dir, url: str, prefix: str):
    from lowbit.ctr.served import load_served
    from lowbit.serve.app import make_app
    model, refs = load_served(model_dir, f"{url}?prefix={prefix}", timeout_s=STORE_TIMEOUT_S)
    return model, make_app(model, refs, str(model_dir))


def expected(model, inputs) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model(*as_sparse(inputs, model.config))).numpy()


def test_version_switch_under_traffic(redis, tmp_path):
    import httpx
    from lowbit.ctr.served import load_served
    from lowbit.serve import Client
    old, new = tiny_model(seed=0), tiny_model(seed=0)
    with torch.no_grad():
        new.bags["user"].weight.mul_(-3.0)  # a visibly different "user" table, same dense part
    old_dir, new_dir = export_served(old, tmp_path / "old"), export_served(new, tmp_path / "new")
    push_all(old_dir.parent, redis.url, "p-")
    served, app = serve_from_redis(old_dir, redis.url, "p-")
    inputs = tiny_inputs(16)
    want = {"old": served.predict_versioned(*as_sparse(inputs, old.config))[0],
            "new": load_served(new_dir)[0].predict_versioned(*as_sparse(inputs, new.config))[0]}
    assert not np.array_equal(want["old"], want["new"])
    answers, errors, stop = [], [], threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=10) as c:
            for _ in range(MAX_REQUESTS_EACH):
                if stop.is_set():
                    return
                r = c.post("/predict", json={"inputs": inputs})
                (answers if r.status_code == 200 else errors).append(r.json())

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + TRAFFIC_WAIT_S
        while len(answers) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    with running(app) as url:
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        wait_for(20)
        before = len(answers)
        versions = push_all(new_dir.parent, redis.url, "p-")  # while the clients keep sending
        with Client(url) as c:
            after = c.predict(inputs)
            assert c.last_versions["user"] == versions["bags.user"]
        wait_for(len(answers) + 20)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    np.testing.assert_array_equal(after.astype(np.float32), want["new"])
    assert not errors and before >= 20
    seen = []
    for a in answers:  # each answer is all-old or all-new, as its reported version says
        which = "new" if a["versions"]["user"] == versions["bags.user"] else "old"
        np.testing.assert_array_equal(np.float32(a["outputs"]["probability"]), want[which])
        seen.append(which)
    assert seen.count("old") >= 20 and seen.count("new") >= 10, (seen.count("old"), seen.count("new"))


def timed_post(url: str, inputs: dict):
    import httpx
    t0 = time.monotonic()
    r = httpx.post(f"{url}/predict", json={"inputs": inputs}, timeout=30)
    return r.status_code, r.json(), time.monotonic() - t0


def test_redis_stopped_gives_503_then_resumes(redis, tmp_path):
    model = tiny_model(seed=3)
    folder = export_served(model, tmp_path / "m")
    push_all(folder.parent, redis.url, "f-")
    served, app = serve_from_redis(folder, redis.url, "f-")
    inputs = tiny_inputs(8)
    want = served.predict_versioned(*as_sparse(inputs, model.config))[0]
    with running(app) as url:
        assert timed_post(url, inputs)[0] == 200
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            code, doc, took = timed_post(url, inputs)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert code == 503 and took < FAULT_BOUND_S, (code, took)
        assert "table store unavailable" in doc["error"] and "Redis unavailable" in doc["error"]
        code, doc, _ = timed_post(url, inputs)  # same process, no restart
        assert code == 200
        np.testing.assert_array_equal(np.float32(doc["outputs"]["probability"]), want)


def test_redis_killed_and_restarted(redis, tmp_path):
    model = tiny_model(seed=4)
    folder = export_served(model, tmp_path / "m")
    push_all(folder.parent, redis.url, "k-")
    served, app = serve_from_redis(folder, redis.url, "k-")
    inputs = tiny_inputs(8)
    want = served.predict_versioned(*as_sparse(inputs, model.config))[0]
    with running(app) as url:
        redis_helpers.stop(redis)
        code, doc, took = timed_post(url, inputs)
        assert code == 503 and took < FAULT_BOUND_S and "Redis unavailable" in doc["error"]
        redis.proc = subprocess.Popen(redis.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + redis_helpers.START_TIMEOUT_S
        while redis.cli("PING").strip() != "PONG" and time.monotonic() < deadline:
            time.sleep(0.05)
        code, doc, _ = timed_post(url, inputs)  # back, but empty (no persistence): still a clear 503
        assert code == 503 and "no table 'k-bags." in doc["error"], doc
        # the fresh Redis numbers versions from 1 again: 4-bit tables now, not the 8-bit ones cached
        four = export_served(model, tmp_path / "m4", bits=4)
        versions = push_all(four.parent, redis.url, "k-")
        assert set(versions.values()) == {1}
        code, doc, _ = timed_post(url, inputs)
        assert code == 200
        from lowbit.ctr.served import load_served
        want4 = load_served(four)[0].predict_versioned(*as_sparse(inputs, model.config))[0]
        assert not np.array_equal(want4, want)
        np.testing.assert_array_equal(np.float32(doc["outputs"]["probability"]), want4)
