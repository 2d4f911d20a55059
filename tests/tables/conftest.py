"""Session fixtures: a real redis-server and a 3-node Redis Cluster on free loopback ports, in temp
dirs, without persistence; killed at the end. Every wait is bounded in count and time. Tests that
use them skip (with the reason) only when the redis-server binary or redis-py is missing."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

START_TIMEOUT_S = 10.0
POLL_S = 0.05


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; a cluster node also needs port + 10000 (its bus) and port <= 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        if _bindable(port) and (not cluster or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found in 200 tries")


def need_redis() -> None:
    """Skip without Redis on a developer machine; in CI (.ci/run sets LOWBIT_REQUIRE_REDIS=1),
    a missing Redis is a failure, not a skip."""
    missing = None
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing = "redis-server / redis-cli not installed (Debian: apt-get install -y redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            missing = "redis-py missing: pip install -e '.[test]'"
    if missing and os.environ.get("LOWBIT_REQUIRE_REDIS") == "1":
        pytest.fail(f"{missing} (LOWBIT_REQUIRE_REDIS=1)")
    if missing:
        pytest.skip(missing)


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    args: list

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10).stdout


def start_server(workdir, *extra: str) -> Server:
    port = free_port(cluster="--cluster-enabled" in extra)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "no", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(port, proc, args)
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.cli("PING").strip() != "PONG":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(POLL_S)
    return server


def stop(server: Server) -> None:
    server.proc.kill()
    server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    need_redis()
    server = start_server(tmp_path_factory.mktemp("redis"))
    yield server
    stop(server)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """Three masters, no replicas; yields the servers (the first one is the entry point)."""
    need_redis()
    servers = []
    try:
        for i in range(3):
            servers.append(start_server(tmp_path_factory.mktemp(f"node{i}"), "--cluster-enabled", "yes",
                                        "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"))
        addrs = [f"127.0.0.1:{s.port}" for s in servers]
        res = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                              "--cluster-yes"], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout[-500:]} {res.stderr[-500:]}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(POLL_S)
        yield servers
    finally:
        for s in servers:
            stop(s)
