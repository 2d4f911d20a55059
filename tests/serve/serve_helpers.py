"""Helpers for the serving tests (a module of its own name: `conftest` names clash across folders): a tiny seeded DLRM with its tables exported and a served model
folder; an in-process uvicorn server on a free loopback port (bounded start and stop); the real
redis-server helpers of tests/tables/conftest.py. Tests skip (with the reason) when FastAPI,
uvicorn or httpx is missing, unless CI requires them (LOWBIT_REQUIRE_REDIS=1)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("tables_conftest", Path(__file__).parents[1] / "tables" / "conftest.py")
redis_helpers = importlib.util.module_from_spec(_spec)
sys.modules["tables_conftest"] = redis_helpers  # dataclasses look their module up there
_spec.loader.exec_module(redis_helpers)

SIZES = {"user": 60, "item": 40, "occupation": 6, "genre": 8}
DIM = 8
START_TIMEOUT_S = 15.0


def need_serve_stack() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("LOWBIT_REQUIRE_REDIS") == "1":
        pytest.fail(f"{missing} missing (pip install -e '.[test]')")
    if missing:
        pytest.skip(f"{missing} missing: pip install -e '.[serve]'")


def tiny_model(seed: int = 0):
    from lowbit.ctr.model import DLRM, CTRConfig
    sparse = tuple((n, r, "mean" if n == "genre" else "sum") for n, r in SIZES.items())
    config = CTRConfig(sparse=sparse, dense=3, dim=DIM, bottom=(16, DIM), top=(16,))
    return DLRM(config, generator=torch.Generator().manual_seed(seed)).eval()


def tiny_inputs(batch: int, seed: int = 1) -> dict:
    """JSON-ready /predict inputs: single keys, ragged genre bags and dense rows."""
    g = torch.Generator().manual_seed(seed)
    inputs = {n: torch.randint(0, r, (batch,), generator=g).tolist() for n, r in SIZES.items() if n != "genre"}
    lens = torch.randint(1, 4, (batch,), generator=g).tolist()
    inputs["genre"] = [torch.randint(0, SIZES["genre"], (k,), generator=g).tolist() for k in lens]
    inputs["dense"] = torch.rand(batch, 3, generator=g).tolist()
    return inputs


def as_sparse(inputs: dict, config) -> tuple[dict, list]:
    from lowbit.serve.inputs import parse_request
    return parse_request({"inputs": inputs}, config)


def export_served(model, root: Path, bits: int = 8):
    """Tables under root/tables, the served model at root/model; returns the model folder."""
    from lowbit import tables
    from lowbit.ctr.served import save_served
    made = tables.export(model, root / "tables", bits=bits, range_method="greedy")
    refs = {n.split(".", 1)[1]: {"table": f.name, "url": f"../tables/{f.name}"} for n, f in made.items()}
    save_served(model, root / "model", refs)
    return root / "model"


def make_served(tmp_path_factory):
    """(trained float model, served model folder) with 8-bit local tables."""
    need_serve_stack()
    model = tiny_model()
    return model, export_served(model, tmp_path_factory.mktemp("served"))


@contextlib.contextmanager
def running(app, port: int | None = None):
    """``app`` on uvicorn in a thread on 127.0.0.1; yields its base URL; stopped on exit."""
    import uvicorn
    port = port or redis_helpers.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
