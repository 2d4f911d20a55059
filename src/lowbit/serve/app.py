"""The HTTP service of `lowbit serve` (FastAPI on uvicorn): a served CTR model
(`lowbit.ctr.served`) behind ``POST /predict``, ``GET /health`` and ``GET /metadata``.

Answers: 200 ``{"outputs": {"probability": [...]}, "versions": {feature: version}}``; 4xx
``{"error": "..."}`` naming the problem (400 not JSON, 413 too large, 422 unknown/missing inputs,
shapes, dtypes, keys out of range); 503 ``{"error": ...}`` when a table store cannot answer within
its timeout (nothing is predicted from partial rows); 500 only for a defect, logged, no traceback
in the answer. The model runs on the thread pool; the event loop only parses and answers.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request  # this module is imported only to serve (lowbit[serve])
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .._version import __version__
from ..tables.format import TableError
from .inputs import InputError, parse_request

MAX_BODY_BYTES = 4 << 20
ENV_NAME = "LOWBIT_SERVE"
log = logging.getLogger("lowbit.serve")


class Answered:
    """The table versions that answered the latest request (per feature), for /metadata."""

    def __init__(self) -> None:
        self._lock, self.versions, self.requests = threading.Lock(), {}, 0

    def note(self, versions: dict) -> None:
        with self._lock:
            self.versions.update(versions)
            self.requests += 1


def table_info(table) -> dict:
    """Store, bits and scheme of one opened table (a Redis that does not answer: the error)."""
    try:
        bits = table.layout.bits if hasattr(table, "layout") else table.meta()["bits"]
    except TableError as exc:
        return {"store": type(table).__name__, "error": str(exc)}
    scheme = f"{bits}-bit row-wise (scale and bias per row)" if bits <= 8 else f"raw float{bits}"
    return {"store": type(table).__name__, "bits": bits, "scheme": scheme}


def metadata(model, refs: dict, source: str, answered: Answered) -> dict:
    config = model.config
    tables = {f: {**refs[f], **table_info(bag.table), "version_answered": answered.versions.get(f)}
              for f, bag in model.bags.items()}
    inputs = {n: {"keys": f"int in [0, {r})", "mode": m} for n, r, m in config.sparse}
    inputs[config.dense_name] = {"floats_per_sample": config.dense}
    return {"model": {"path": source, "kind": "DLRM", "config": config.to_json()}, "inputs": inputs,
            "outputs": {"probability": "float per sample"}, "tables": tables,
            "requests_answered": answered.requests, "lowbit_version": __version__,
            "torch_version": torch.__version__}


async def read_body(request, limit: int) -> bytes:
    """The body, refusing (413) a declared or actual size over ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"request body of {declared} bytes; the limit is {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def predict_body(model, raw: bytes) -> tuple[dict, int]:
    """Parse, validate and run one request (on a worker thread)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not valid JSON: {exc}", status=400) from None
    sparse, dense = parse_request(body, model.config)
    probs, versions = model.predict_versioned(sparse, dense)
    return {"outputs": {"probability": probs.tolist()}, "versions": versions}, len(dense)


def make_app(model, refs: dict, source: str = "", max_body: int = MAX_BODY_BYTES):
    """The FastAPI application serving ``model`` (a served `lowbit.ctr.DLRM`)."""
    app = FastAPI(title="lowbit serve", version=__version__, docs_url=None, redoc_url=None)
    answered = Answered()

    @app.middleware("http")
    async def request_log(request: Request, call_next):
        t0 = time.perf_counter()
        request.state.log = {}
        response = await call_next(request)
        log.info("request", extra={"event": "request", "method": request.method, "path": request.url.path,
                                   "status": response.status_code, "ms": round((time.perf_counter() - t0) * 1e3, 2),
                                   **request.state.log})
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/metadata")
    async def meta():
        return await run_in_threadpool(metadata, model, refs, source, answered)

    @app.post("/predict")
    async def predict(request: Request):
        try:
            raw = await read_body(request, max_body)
            doc, batch = await run_in_threadpool(predict_body, model, raw)
        except InputError as exc:
            return _error(request, exc.status, str(exc))
        except TableError as exc:  # StoreUnavailable included: the store did not answer in time
            return _error(request, 503, f"table store unavailable, retry later: {exc}")
        answered.note(doc["versions"])
        request.state.log.update(batch=batch, versions=doc["versions"])
        return JSONResponse(doc)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("internal error", exc_info=exc, extra={"event": "error", "path": request.url.path})
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)

    def _error(request, status: int, message: str):
        request.state.log.update(error=message)
        return JSONResponse({"error": message}, status)

    app.state.answered = answered
    return app


def app_from_env():
    """uvicorn's factory (one call per worker process): settings from the ``LOWBIT_SERVE`` JSON."""
    from ..ctr.served import load_served
    cfg = json.loads(os.environ[ENV_NAME])
    torch.set_num_threads(int(cfg.get("threads", 1)))
    model, refs = load_served(cfg["dir"], cfg.get("tables"), float(cfg.get("timeout_s", 1.0)))
    log.info("model loaded", extra={"event": "loaded", "dir": cfg["dir"], "tables": refs, "pid": os.getpid()})
    return make_app(model, refs, str(Path(cfg["dir"]).resolve()), int(cfg.get("max_body", MAX_BODY_BYTES)))
