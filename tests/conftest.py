"""Suite-wide settings: kernel choices are pinned (deterministic, nothing timed) and any kernel
cache goes to a temporary folder, never the user's cache. Tests of the selector itself pass their
own `KernelSelector` or unset LOWBIT_KERNEL with monkeypatch. The machine's load never makes a
decision provisional here (`select.oversubscribed` reads no load; its own tests set it)."""
from __future__ import annotations

import os
import tempfile

import pytest

# first path a layer offers, in this order: every kernel family is exercised, none is timed
# (codebook layers: the exact fp32 tiled form first, then gather, the lookup tables, bf16)
PINNED_PATHS = "w8a8-static,w8a8,int4mm,int8mm,f32,bf16,ref,pq-tiled,pq-gather,pq-lut,pq-lutg,pq-bf16"

os.environ.setdefault("LOWBIT_KERNEL", PINNED_PATHS)
os.environ.setdefault("LOWBIT_CACHE_DIR", tempfile.mkdtemp(prefix="lowbit-test-cache-"))


@pytest.fixture(autouse=True)
def _steady_machine(monkeypatch):
    from lowbit.kernels import select
    monkeypatch.setattr(select, "oversubscribed", lambda: None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests, restored afterwards (modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``): ~100 small ops a call on a busy
    2-core machine ran 10-100x slower with two threads (0.07 s -> 14 s)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
