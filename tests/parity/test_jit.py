"""Parity: `kernels.jit` (numba-compiled loops) against their plain-torch twins.

Codes and per-token parameters are equal bit for bit, serial and parallel variants alike; the
float epilogues follow the twins' operation order, so they differ only where torch fuses a
multiply-add (a rounding or two, well inside `test_int8_dynamic.EPILOGUE_ULPS`). Skipped where
numba is not installed (the twins then run everywhere, and the rest of the suite covers them).
"""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import int8_dynamic as k8, jit
from lowbit.primitives import quantize_weight
from lowbit.primitives.tokens import token_params, token_range
from lowbit.spec import parse_scheme

pytest.importorskip("numba")
VARIANTS = ["", "_par"]
EPILOGUE_ABS = 1e-5  # relative to the output's magnitude (outputs ~1-30 here): [2.9e-7 measured]


def kernels() -> dict:
    assert jit.kernel("token_codes") is not None, jit.status()
    return jit._tables[jit._define]


def adversarial_rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 96, generator=gen) * torch.logspace(-30, 30, 300).unsqueeze(1)
    x[:60] = 1000.0 + torch.rand(60, 96, generator=gen) * torch.logspace(-6, 3, 60).unsqueeze(1)
    x[60:90] = -x[60:90].abs() - torch.logspace(-3, 3, 30).unsqueeze(1)
    x[90] = 0.0
    x[91] = -7.25
    x[92] = 0.0
    x[92, 5] = 3.0
    x[93] = -0.0
    x[93, :3] = 0.0  # signed zeros mixed: the integer ordering puts -0.0 below +0.0
    x[94, 9] = float("inf")
    x[95, 2] = -float("inf")
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_codes_equal_the_twin_bit_for_bit(variant):
    x = adversarial_rows()
    q, s, z = kernels()["token_codes" + variant](x.numpy(), *k8._TOKEN_CONSTANTS)
    want_q, want_s, want_z = k8.quantize_tokens(x)
    finite = torch.isfinite(x).all(1)
    assert torch.equal(torch.from_numpy(q)[finite], want_q[finite])
    assert torch.equal(torch.from_numpy(s), want_s.view(-1))
    assert torch.equal(torch.from_numpy(z)[finite], want_z.view(-1)[finite])
    lo, hi = token_range(x)  # the in-kernel integer min / max equals torch's amin / amax
    assert torch.equal(torch.from_numpy(s), token_params(lo, hi)[0].view(-1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grid_codes_equal_the_twin_bit_for_bit(variant):
    x = adversarial_rows()[:90] * 1e-28  # rows inside and far outside one grid: clamped both ends
    for scale, zp in ((0.02, 99.5), (3.0e-5, 0.0), (1.7, 255.0)):
        got = kernels()["grid_codes" + variant](x.numpy(), torch.tensor(scale).numpy(),
                                                 torch.tensor(zp).numpy(), k8._TOKEN_CONSTANTS[0])
        assert torch.equal(torch.from_numpy(got), k8.quantize_static(x, scale, zp))


def layer(m: int, k: int, n: int):
    gen = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen) * 3 + 0.5
    return x, quantize_weight(w, parse_scheme("w8")), torch.randn(n, generator=gen)


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (13, 384, 384), (300, 300, 250)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dynamic_linear_equals_the_torch_twin(m, k, n, with_bias, monkeypatch):
    x, qw, bias = layer(m, k, n)
    bias = bias if with_bias else None
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    twin = k8.w8a8_linear_torch(x, prepared, bias)
    for threads in (1, 2):  # 300 x 300 on 2 threads: the parallel variants
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        y = k8.w8a8_linear(x, prepared, bias)
        assert ((y - twin).abs() <= EPILOGUE_ABS * twin.abs().clamp(min=1)).all()


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (300, 300, 250)])
def test_static_linear_equals_the_torch_twin(m, k, n, monkeypatch):
    x, qw, bias = layer(m, k, n)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    twin = k8.w8a8_static_linear_torch(x, prepared, 0.05, 97.0, bias)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        y = k8.w8a8_static_linear(x, prepared, 0.05, 97.0, bias)
        assert ((y - twin).abs() <= EPILOGUE_ABS * twin.abs().clamp(min=1)).all()


def test_parallel_only_for_large_inputs_on_several_threads(monkeypatch):
    kernels()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert jit.kernel("token_codes", jit.PARALLEL_MIN) is kernels()["token_codes_par"]
    assert jit.kernel("token_codes", jit.PARALLEL_MIN - 1) is kernels()["token_codes"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert jit.kernel("token_codes", 1 << 30) is kernels()["token_codes"]


def test_the_remembered_choice_is_per_thread_count_and_calling_thread(monkeypatch):
    """kernel() remembers its decision; a new thread count or a new calling thread decides again
    (numba's thread count is set per calling thread)."""
    import threading

    import numba
    if not jit._parallel_ok:
        pytest.skip("numba has no thread-safe threading layer here")
    kernels()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert jit.kernel("token_codes", jit.PARALLEL_MIN) is kernels()["token_codes_par"]
    assert jit.kernel("token_codes", jit.PARALLEL_MIN) is kernels()["token_codes_par"]
    seen = {}

    def other():
        numba.set_num_threads(1)  # this thread's own count, which kernel() must set again
        seen["run"] = jit.kernel("token_codes", jit.PARALLEL_MIN)
        seen["threads"] = numba.get_num_threads()
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == {"run": kernels()["token_codes_par"],
                    "threads": min(2, numba.config.NUMBA_NUM_THREADS)}
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert jit.kernel("token_codes", jit.PARALLEL_MIN) is kernels()["token_codes"]


def test_a_forked_child_runs_kernels_on_the_calling_thread(monkeypatch):
    kernels()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(jit, "_parallel_pid", -1)  # as if the threads were started by a parent
    assert jit.kernel("token_codes", jit.PARALLEL_MIN) is kernels()["token_codes"]


def test_lowbit_jit_0_runs_the_twins(monkeypatch):
    x, qw, bias = layer(5, 64, 8)
    prepared = k8.prepare_w8a8(qw.qdata, qw.scale)
    monkeypatch.setenv(jit.ENV, "0")
    assert jit.kernel("token_codes") is None and jit.status() == "off (LOWBIT_JIT=0)"
    assert torch.equal(k8.w8a8_linear(x, prepared, bias), k8.w8a8_linear_torch(x, prepared, bias))
