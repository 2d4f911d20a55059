"""Compiled loops for the CPU (numba), where a chain of small torch ops costs more than the work.

Some kernels are a handful of passes over a few kilobytes: quantizing 13 tokens of 384 features,
the zero-point epilogue of an int8 product, probing a hash index for 100 keys. Each torch or numpy
op costs 2-5 us of dispatch however small its tensor, so such a kernel spends most of its time
between ops. numba compiles a plain Python loop over numpy arrays to machine code for this CPU
(LLVM, ``-march`` of the host): one call, one pass, no temporaries.

Rules (docs/design.md, "Kernels"):
- Every compiled kernel has a plain-torch (or numpy) twin, which is also the fallback, and a parity
  test; integer results are equal bit for bit, floats within a named budget.
- numba is imported lazily, on the first call that needs a compiled kernel: importing lowbit does
  not pay for it (about 1 s), and a machine without numba (or with ``LOWBIT_JIT=0``) runs the twins.
- Compiled code is cached on disk (``cache=True``) under ``<lowbit cache dir>/numba`` unless
  ``NUMBA_CACHE_DIR`` is already set, so a process pays the compile (0.1-0.6 s a kernel) once per
  machine, not once per run. The cache is keyed by numba on the source file and the CPU.
- Constants come in as arguments (from `primitives`), never as closure values, since numba keys its
  cache on the kernel's own source file only.
- Small inputs run on the calling thread. From `PARALLEL_MIN` elements, while torch runs several
  threads, a kernel's ``_par`` variant (the same body, ``prange`` over rows) runs on as many of
  numba's threads, through a thread-safe layer only (OpenMP or TBB; ``NUMBA_THREADING_LAYER=
  threadsafe``), so server threads may call kernels at once.

`kernel(name, elements, define)` returns the compiled function from a table of kernels (this
module's `_define` by default; tables, PQ and others bring their own ``define``), or None when
compiled kernels are off; callers then take their twin.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Callable

import torch

ENV = "LOWBIT_JIT"  # "0" turns compiled kernels off (the twins run)
PARALLEL_MIN = 1 << 16  # elements from which a kernel runs on torch's thread count

_lock = threading.Lock()
_loaded = False
_tables: dict[Callable, dict[str, Callable]] = {}  # define function -> its compiled kernels
_failed: str | None = None
_parallel_ok = False
_parallel_pid: int | None = None  # the process that started numba's threads (see kernel())
_chosen: dict[tuple, Callable] = {}  # kernel()'s decisions (see there)
_CHOSEN_MAX = 4096


_OFF = ("0", "false", "no", "off")
# os.environ's own store (bytes keys on POSIX), read directly: `kernel` checks the switch on every
# call, and os.environ.get costs 0.8 us here against 0.05 us (a 384x384 layer's gather is 12 us)
_ENV_STORE = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = ENV.encode()


def enabled() -> bool:
    if isinstance(_ENV_STORE, dict):
        v = _ENV_STORE.get(_ENV_KEY)
        return v is None or v.decode(errors="replace") not in _OFF
    return os.environ.get(ENV, "1") not in _OFF


def status() -> str:
    """One line for `lowbit kernels`: whether compiled kernels run here, and why not."""
    if not enabled():
        return f"off ({ENV}=0)"
    if _load() is None:
        return f"off ({_failed})"
    import numba
    threads = "threads: OpenMP/TBB" if _parallel_ok else "calling thread only (no OpenMP/TBB layer)"
    return f"numba {numba.__version__}, {threads}, cache {_cache_dir()}"


def kernel(name: str, elements: int = 0, define: Callable[[], dict] | None = None,
           parallel_min: int = PARALLEL_MIN) -> Callable | None:
    """The compiled kernel ``name`` of the table that ``define`` returns (this module's int8
    activation kernels by default; another module passes its own ``define``, a function that
    imports numba inside and returns ``{name: dispatcher}``, built once per process), or None
    when compiled kernels are off here. For inputs of at least `PARALLEL_MIN` ``elements`` while
    torch runs more than one thread, the ``<name>_par`` variant if the table has one, spread over
    as many of numba's threads as torch uses (fewer elements: the calling thread; starting the
    threads costs more than it saves). A kernel whose output feeds a multi-threaded torch op may
    set its own ``parallel_min`` (`pq_jit.RowGather`: each thread then writes the part of the
    weight its GEMM thread reads)."""
    if not enabled():
        return None
    threads = torch.get_num_threads()
    # the choice depends only on these; remembered per calling thread (numba's thread count is
    # set per thread) and process (a forked child decides afresh): 0.6 us instead of 2.7 us, on
    # a 384x384 layer's 12 us gather
    key = (define, name, threads, elements >= parallel_min, os.getpid(), _parallel_pid,
           threading.get_ident())
    run = _chosen.get(key)
    if run is not None:
        return run
    if _load() is None:
        return None
    table = _tables.get(define or _define)
    if table is None:
        with _lock:
            table = _tables.setdefault(define or _define, (define or _define)())
    run = table[name]
    if (elements >= parallel_min and threads > 1 and _parallel_ok and name + "_par" in table
            and _not_a_forked_child()):
        import numba
        threads = min(threads, numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != threads:  # numba's count is per calling thread
            numba.set_num_threads(threads)
        run = table[name + "_par"]
    if len(_chosen) >= _CHOSEN_MAX:  # many short-lived threads: start over
        _chosen.clear()
    _chosen[key] = run
    return run


def _not_a_forked_child() -> bool:
    """False in a process forked from one that had started numba's threads: GNU OpenMP's pool is
    not fork-safe (a child that enters a parallel region can hang), so there kernels stay on the
    calling thread. The first process to run a parallel kernel records its pid."""
    global _parallel_pid
    if _parallel_pid is None:
        _parallel_pid = os.getpid()
    return _parallel_pid == os.getpid()


def _cache_dir() -> str:
    from .select import default_cache_dir
    return os.environ.get("NUMBA_CACHE_DIR") or str(default_cache_dir() / "numba")


def _load() -> bool | None:
    """Import numba once (True), or None when it is not installed."""
    global _loaded, _failed, _parallel_ok
    if _loaded or _failed is not None:
        return _loaded or None
    with _lock:
        if not _loaded and _failed is None:
            os.environ.setdefault("NUMBA_CACHE_DIR", _cache_dir())
            # only a thread-safe layer (TBB or OpenMP): numba's own "workqueue" aborts when two
            # Python threads (a server's workers) launch parallel kernels at once
            os.environ.setdefault("NUMBA_THREADING_LAYER", "threadsafe")
            try:
                importlib.import_module("numba")  # lazy: about 1 s
            except ImportError as e:  # the twins run; `lowbit kernels` says why
                _failed = f"numba is not installed: {e}"
            else:
                _parallel_ok = _threadsafe_layer()
                _loaded = True
    return _loaded or None


def _threadsafe_layer() -> bool:
    """Whether numba has a thread-safe threading layer here (OpenMP or TBB); without one, every
    kernel runs on the calling thread."""
    for module in ("numba.np.ufunc.omppool", "numba.np.ufunc.tbbpool"):
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


def _define() -> dict[str, Callable]:
    """Compile-on-first-call dispatchers of the int8 activation kernels. Each kernel body is written
    once (``prange`` over rows, a plain ``range`` when compiled serially) and wrapped twice under
    its own name: ``<name>`` on the calling thread and ``<name>_par`` over numba's threads, so their
    cached code never mixes (numba's disk cache keys a function on its qualified name and line,
    which is also why the wrappers are written out, not made by a factory). Constants come in as
    arguments (from `primitives`), so a cached kernel cannot go stale when they change: numba keys
    its cache on this file alone."""
    return {**_token_codes(), **_zp_epilogue(), **_grid_codes(), **_grid_epilogue()}


def _decorators():
    """(inlined body, serial, parallel) njit decorators. No fastmath anywhere: results must equal
    the twins' roundings."""
    from numba import njit
    return (njit(inline="always"), njit(cache=True, nogil=True),
            njit(cache=True, nogil=True, parallel=True))


def _names():
    import numpy as np
    from numba import prange
    return prange, np, np.float32, np.int32


def _token_codes() -> dict[str, Callable]:
    """Dynamic w8a8: per-row range, grid and uint8 codes (`kernels.int8_dynamic.w8a8_linear`)."""
    body, serial, parallel = _decorators()
    prange, np, f32, i32 = _names()

    @body
    def token_codes_body(x, qmax, rel, tiny):
        # The row range on the floats' bit patterns mapped to int32s that sort as the floats do
        # (b ^ ((b >> 31) & 0x7FFFFFFF)): LLVM vectorizes an integer min/max reduction, not a float
        # one (NaN ordering): 960 x 384 in 40 us, against 190 us as a float loop and 52 us for
        # torch's amin + amax (AMD EPYC, 1 thread). Then `primitives.tokens.token_params` and
        # rint(x / scale + zero_point), float32 operation for operation.
        m_rows, k_cols = x.shape
        bits = x.view(i32)
        low31 = i32(0x7FFFFFFF)
        q = np.empty((m_rows, k_cols), np.uint8)
        scale = np.empty(m_rows, f32)
        zero_point = np.empty(m_rows, f32)
        for m in prange(m_rows):
            lo_i, hi_i = i32(0x7FFFFFFF), i32(-0x80000000)
            for k in range(k_cols):
                b = bits[m, k]
                v = b ^ ((b >> i32(31)) & low31)
                lo_i = min(lo_i, v)
                hi_i = max(hi_i, v)
            ends = np.empty(2, i32)
            ends[0] = lo_i ^ ((lo_i >> i32(31)) & low31)
            ends[1] = hi_i ^ ((hi_i >> i32(31)) & low31)
            ends_f = ends.view(f32)
            neg_lo, h = -ends_f[0], ends_f[1]
            floor = max(max(h, neg_lo) * rel, tiny)
            s = max((h + neg_lo) / qmax, floor)
            z = neg_lo / s
            for k in range(k_cols):
                q[m, k] = np.uint8(np.int32(np.rint(x[m, k] / s + z)))
            scale[m] = s
            zero_point[m] = z
        return q, scale, zero_point

    @serial
    def token_codes(x, qmax, rel, tiny):
        return token_codes_body(x, qmax, rel, tiny)

    @parallel
    def token_codes_par(x, qmax, rel, tiny):
        return token_codes_body(x, qmax, rel, tiny)

    return {"token_codes": token_codes, "token_codes_par": token_codes_par}


def _zp_epilogue() -> dict[str, Callable]:
    """Dynamic w8a8: the zero-point epilogue over the int32 product's own buffer."""
    body, serial, parallel = _decorators()
    prange, np, f32, i32 = _names()

    @body
    def zp_epilogue_body(acc, s_x, z_x, col_sum, s_w, bias):
        out = acc.view(f32)
        for m in prange(acc.shape[0]):
            a = s_x[m]
            z = z_x[m]
            for n in range(acc.shape[1]):
                out[m, n] = (f32(acc[m, n]) - z * col_sum[n]) * a * s_w[n] + bias[n]
        return out

    @serial
    def zp_epilogue(acc, s_x, z_x, col_sum, s_w, bias):
        return zp_epilogue_body(acc, s_x, z_x, col_sum, s_w, bias)

    @parallel
    def zp_epilogue_par(acc, s_x, z_x, col_sum, s_w, bias):
        return zp_epilogue_body(acc, s_x, z_x, col_sum, s_w, bias)

    return {"zp_epilogue": zp_epilogue, "zp_epilogue_par": zp_epilogue_par}


def _grid_codes() -> dict[str, Callable]:
    """Static w8a8: uint8 codes on one fixed grid, clamped."""
    body, serial, parallel = _decorators()
    prange, np, f32, i32 = _names()

    @body
    def grid_codes_body(x, scale, zero_point, qmax):
        q = np.empty(x.shape, np.uint8)
        for m in prange(x.shape[0]):
            for k in range(x.shape[1]):
                t = x[m, k] / scale + zero_point
                q[m, k] = np.uint8(np.int32(np.rint(min(max(t, f32(0.0)), qmax))))
        return q

    @serial
    def grid_codes(x, scale, zero_point, qmax):
        return grid_codes_body(x, scale, zero_point, qmax)

    @parallel
    def grid_codes_par(x, scale, zero_point, qmax):
        return grid_codes_body(x, scale, zero_point, qmax)

    return {"grid_codes": grid_codes, "grid_codes_par": grid_codes_par}


def _grid_epilogue() -> dict[str, Callable]:
    """Static w8a8: ``acc * mul + add`` over the int32 product's own buffer."""
    body, serial, parallel = _decorators()
    prange, np, f32, i32 = _names()

    @body
    def grid_epilogue_body(acc, scale, zero_point, col_sum, s_w, bias):
        n_cols = acc.shape[1]
        mul = np.empty(n_cols, f32)
        add = np.empty(n_cols, f32)
        for n in range(n_cols):
            mul[n] = s_w[n] * scale
            add[n] = mul[n] * -zero_point * col_sum[n] + bias[n]
        out = acc.view(f32)
        for m in prange(acc.shape[0]):
            for n in range(n_cols):
                out[m, n] = f32(acc[m, n]) * mul[n] + add[n]
        return out

    # One wrapper per (kernel, threading), written out: numba's disk cache keys a function on its
    # qualified name and line, so wrappers made by a factory would share one cache entry.

    @serial
    def grid_epilogue(acc, scale, zero_point, col_sum, s_w, bias):
        return grid_epilogue_body(acc, scale, zero_point, col_sum, s_w, bias)

    @parallel
    def grid_epilogue_par(acc, scale, zero_point, col_sum, s_w, bias):
        return grid_epilogue_body(acc, scale, zero_point, col_sum, s_w, bias)

    return {"grid_epilogue": grid_epilogue, "grid_epilogue_par": grid_epilogue_par}
