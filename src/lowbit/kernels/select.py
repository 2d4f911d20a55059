"""Kernel choice measured on the host, cached per CPU, torch build and thread count.

Which compute path serves a layer depends on the CPU, not only on the shape (DESIGN rule 11: a
bf16 GEMM took 1.8x fp32's time on an Intel Xeon without AMX and 0.4x on an AMD EPYC). So for a
layer's candidate paths (callables that run the layer once on M rows) `KernelSelector.choose` times
them on this machine with a short, bounded micro-benchmark, once per weight-shape class and row
bucket, and remembers the fastest in a JSON file. CPU flags and `torch.backends.cpu` only *order*
the candidates (ties go to the first); they never decide.

Cache file ``<cache dir>/kernels-<key>.json``, the cache dir being ``$LOWBIT_CACHE_DIR`` or
``platformdirs.user_cache_dir("lowbit")``, and ``<key>`` the first 16 hex digits of the SHA-256 of
the host description (`host_key`; ``code``: `code_digest`, so new kernel code is timed afresh)::

    {"version": 2,
     "host": {"cpu": "AMD EPYC", "flags": ["avx512_bf16", ...], "capability": "AVX512",
              "torch": "2.13.0+cpu", "threads": 1, "code": "3f2a9c0b17de"},
     "choices": {"<shape class>": {"<row bucket>": {"path": "w8a8", "ms": {"w8a8": 0.41, ...}}}},
     "sha256": "<hex of the canonical JSON of choices>"}

A file that cannot be read, has another version, another host or a wrong checksum is ignored and
rewritten (temporary file, fsync, rename) at the next decision. ``LOWBIT_KERNEL=<path>[,<path>...]``
forces the first listed path a layer offers (an error names the layer's paths when it offers none);
`KernelSelector.pinned` gives tests the same without the environment and never times anything.

Path names are the callers' (``fp32``, ``f32``, ``bf16``, ``int8mm``, ``int4mm``, ``w8a8``,
``w8a8-static``, ...); `NEEDS_FLAGS` names the ones whose speed rests on a CPU feature. A cold
cache costs, per (shape class, row bucket) that a model actually meets, one warm-up and
`PRUNE_AFTER` timed calls per candidate, then rounds of the candidates still in the race until
`BUDGET_S` (``ms`` in the file: the least time of each candidate's timed calls).

A decision timed while the machine was oversubscribed (1-minute load average above the cores this
process may use, or more threads wanting a core right now than there are: `oversubscribed`,
checked before and after the timing) is stored with ``"provisional": true`` and its ``load``: it is
used, but timed again by the first process that needs it on a machine that is not oversubscribed.
Under heavy load even the least of a few calls can be a preempted one (seen here: a 1,024-row
int8 product recorded at 629 ms against 78 ms for fp32 at load 17 on 2 cores), and a wrong
choice written once would otherwise stay for good.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from ..errors import LowbitError

CACHE_VERSION = 2  # 2: the float layer timed beside the candidates ("fp32"), contiguous inputs
CACHE_ENV = "LOWBIT_CACHE_DIR"
FORCE_ENV = "LOWBIT_KERNEL"
# (first row, last row or None, representative M timed for the bucket)
ROW_BUCKETS = ((1, 1, 1), (2, 8, 4), (9, 32, 16), (33, 128, 64), (129, 512, 256), (513, None, 1024))
BUDGET_S = 0.25     # timing budget of one decision (shape class x row bucket), after one warm-up
MAX_ROUNDS = 7
PRUNE_FACTOR = 4.0  # this many times the fastest after PRUNE_AFTER rounds ends a candidate's timing
PRUNE_AFTER = 2
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8")
# Candidates whose speed rests on a CPU feature; without it they are timed last.
NEEDS_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "pq-bf16": ("avx512_bf16", "amx_bf16"),
               "pq-bf16-jit": ("avx512_bf16", "amx_bf16"),
               "w8a8": ("avx512_vnni", "avx_vnni", "amx_int8"),
               "w8a8-static": ("avx512_vnni", "avx_vnni", "amx_int8")}

Candidate = Callable[[int], object]
REFERENCE = "fp32"  # the float layer's time, stored beside the candidates', never chosen


class KernelChoiceError(LowbitError):
    """A forced or pinned path that a layer does not offer."""


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and the flags in `RELEVANT_FLAGS` it has (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
        if flags and model:
            break
    return model, sorted(f for f in RELEVANT_FLAGS if f in flags)


def describe_host(threads: int | None = None) -> dict:
    """What a kernel choice depends on: CPU model and flags, torch build, thread count, and the
    code of the paths timed (`code_digest`)."""
    model, flags = cpu_model_and_flags()
    return {"cpu": model, "flags": flags, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "threads": int(threads if threads is not None else torch.get_num_threads()),
            "code": code_digest()}


_code: str | None = None


def code_digest() -> str:
    """The first 12 hex digits of the SHA-256 of lowbit's kernel and layer sources
    (``kernels/*.py``, ``nn/*.py``): a choice measured on other code (an upgrade, a faster
    form) is timed again instead of being trusted. Read once per process."""
    global _code
    if _code is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for f in sorted([*root.joinpath("kernels").glob("*.py"), *root.joinpath("nn").glob("*.py")]):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        _code = h.hexdigest()[:12]
    return _code


def host_key(host: dict) -> str:
    return hashlib.sha256(_canonical(host).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("lowbit"))


def shape_class(kind: str, bits: int, group_size: int | None, n: int, k: int) -> str:
    """Weight-shape class: kind, bits, group and (out, in) rounded to the nearest power of 2."""
    return f"{kind}/w{bits}g{group_size or 0}/{_pow2(n)}x{_pow2(k)}"


def row_bucket(rows: int) -> tuple[str, int]:
    """Label and representative M of the bucket holding ``rows`` (0 counts as 1)."""
    rows = max(int(rows), 1)
    for lo, hi, rep in ROW_BUCKETS:
        if hi is None or rows <= hi:
            return (f"{lo}+" if hi is None else str(lo) if hi == lo else f"{lo}-{hi}"), rep
    raise AssertionError("the last bucket is open-ended")


def order_candidates(names: Sequence[str], host: dict) -> list[str]:
    """Candidates whose feature the host lacks go last; otherwise the given order stays."""
    def lacks(name: str) -> bool:
        need = NEEDS_FLAGS.get(name)
        return need is not None and not set(need) & set(host["flags"])
    return sorted(names, key=lacks)  # stable


def time_candidates(candidates: dict[str, Candidate], m: int, budget_s: float = BUDGET_S,
                    max_rounds: int = MAX_ROUNDS) -> dict[str, float]:
    """Least ms per candidate on ``m`` rows. One untimed warm-up call each (it may build inputs),
    then interleaved rounds (each candidate once per round) until ``budget_s`` is spent (after at
    least `PRUNE_AFTER` rounds) or ``max_rounds`` ran. After `PRUNE_AFTER` rounds a candidate
    slower than `PRUNE_FACTOR` x the fastest runs no more. The least, not the median: on a shared
    machine other jobs only ever add time (a preempted call read 8-40 ms where the same call took
    0.1 ms), so the least of few samples is the steadiest estimate of what a path costs."""
    with torch.inference_mode():
        for fn in candidates.values():
            fn(m)
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        live, start = list(candidates), time.perf_counter()
        for r in range(max_rounds):
            for name in live:
                samples[name].append(_time_ms(candidates[name], m))
            if r + 1 == PRUNE_AFTER:  # the reference (float layer) is never pruned: it is the yardstick
                limit = PRUNE_FACTOR * min(min(v) for v in samples.values())
                live = [name for name in live if min(samples[name]) <= limit or name == REFERENCE]
            if r + 1 >= PRUNE_AFTER and time.perf_counter() - start > budget_s:
                break
    return {name: min(v) for name, v in samples.items()}


def oversubscribed() -> float | None:
    """How oversubscribed this machine is for timing at the current thread count, or None when it
    is not (or the OS does not say): the 1-minute load average when it exceeds the cores this
    process may run on, else the number of threads wanting a core right now (other runnable
    tasks, from /proc/loadavg, plus this process's torch threads) when that exceeds them. The
    instant count catches a job that started seconds ago, which the 1-minute average still hides
    (a single-thread job beside a 2-thread decision on 2 cores)."""
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    except (OSError, AttributeError):
        return None
    if not cores:
        return None
    if load > cores + 0.5:
        return load
    others = _others_running()
    wanting = None if others is None else others + torch.get_num_threads()
    return float(wanting) if wanting is not None and wanting > cores else None


def _others_running() -> int | None:
    """Runnable tasks on the machine now that are not this process's threads (field 4 of
    /proc/loadavg, "running/total", less this process's threads in state R: torch's worker
    threads spin for a while after a parallel op and count as running); None where /proc does not
    say."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            try:
                own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue  # a thread that ended while we read
    except (OSError, ValueError, IndexError):
        return None
    return max(running - max(own, 1), 0)


def _time_ms(fn: Candidate, m: int) -> float:
    t0 = time.perf_counter()
    fn(m)
    return (time.perf_counter() - t0) * 1e3


class KernelSelector:
    """Chooses a layer's path per row bucket by timing on this host; decisions cached on disk."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, budget_s: float = BUDGET_S,
                 pinned: Sequence[str] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.budget_s = budget_s
        self._pinned = tuple(pinned) if pinned is not None else None
        self._static = None
        self._keys: dict[int, str] = {}     # thread count -> host key
        self._loaded: dict[str, dict] = {}  # host key -> choices

    @classmethod
    def pinned(cls, paths: Sequence[str]) -> "KernelSelector":
        """A selector that picks the first of ``paths`` a layer offers; never times, never caches."""
        return cls(pinned=paths)

    def host(self) -> dict:
        if self._static is None:
            self._static = describe_host()
        return {**self._static, "threads": torch.get_num_threads()}

    def key(self) -> str:
        """This host's cache key at the current thread count (memoized: `choose` runs per call)."""
        threads = torch.get_num_threads()
        if threads not in self._keys:
            self._keys[threads] = host_key(self.host())
        return self._keys[threads]

    def path(self) -> Path:
        return (self.cache_dir or default_cache_dir()) / f"kernels-{self.key()}.json"

    def choose(self, shape_key: str, rows: int, candidates: dict[str, Candidate],
               reference: Candidate | None = None) -> str:
        """The path for ``rows`` activation rows of a layer of class ``shape_key``. ``reference``
        (the float layer, never chosen) is timed beside the candidates and kept in the cache as
        ``ms["fp32"]``, so reports can say whether the choice is faster than float here."""
        if not candidates:
            raise KernelChoiceError(f"{shape_key}: no candidate paths")
        preference = self._pinned or _forced()
        if preference is not None:
            return _first_offered(preference, candidates, shape_key)
        bucket, m = row_bucket(rows)
        choices = self._choices()
        known = choices.get(shape_key, {}).get(bucket)
        usable = known is not None and known.get("path") in candidates and \
            (reference is None or REFERENCE in known.get("ms", {}))
        if usable and not known.get("provisional"):
            return known["path"]  # the common case: no /proc reads
        load = oversubscribed()
        if usable and load is not None:
            return known["path"]  # provisional, and still no quiet machine to re-time it on
        names = order_candidates(list(candidates), self.host())
        timed = {n: candidates[n] for n in names}
        if reference is not None:
            timed[REFERENCE] = reference
        ms = time_candidates(timed, m, self.budget_s)
        load = load or oversubscribed()  # a job may have started while we timed
        best = min(names, key=lambda n: ms[n])  # first of equals: the capability order
        entry = {"path": best, "ms": ms}
        if load is not None:
            entry.update(provisional=True, load=round(load, 2))
        choices.setdefault(shape_key, {})[bucket] = entry
        self._save(choices)
        return best

    def timings(self, shape_key: str, rows: int) -> dict | None:
        """The cached decision for ``shape_key`` at ``rows`` rows (``{"path", "ms"}``), or None."""
        return self._choices().get(shape_key, {}).get(row_bucket(rows)[0])

    def cached_choices(self) -> list[dict]:
        """Rows (shape, bucket, path, ms) of this host's cache, for ``lowbit kernels``."""
        return [{"shape": shape, "bucket": bucket, **entry}
                for shape, buckets in sorted(self._choices().items())
                for bucket, entry in buckets.items()]

    def clear(self) -> None:
        """Forget this host's decisions (``lowbit kernels --refresh``)."""
        self._loaded.pop(self.key(), None)
        self.path().unlink(missing_ok=True)

    def _choices(self) -> dict:
        key = self.key()
        if key not in self._loaded:
            self._loaded[key] = read_cache(self.path(), self.host())
        return self._loaded[key]

    def _save(self, choices: dict) -> None:
        """Merge into what the file holds now (another process may have added classes), write."""
        merged = read_cache(self.path(), self.host())
        for shape, buckets in choices.items():
            merged.setdefault(shape, {}).update(buckets)
        choices.update(merged)
        write_cache(self.path(), self.host(), merged)


def cached_choices(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """This host's cached decisions (current thread count), for ``lowbit kernels``."""
    return KernelSelector(cache_dir).cached_choices()


def read_cache(path: Path, host: dict) -> dict:
    """The choices in ``path`` if it is a valid cache for ``host``, else {} (it will be rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(data, dict) and data.get("version") == CACHE_VERSION
              and data.get("host") == host and isinstance(data.get("choices"), dict)
              and data.get("sha256") == _digest(data["choices"]))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data["choices"] if ok else {}


def write_cache(path: Path, host: dict, choices: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": CACHE_VERSION, "host": host, "choices": choices, "sha256": _digest(choices)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _forced() -> tuple[str, ...] | None:
    value = os.environ.get(FORCE_ENV, "").strip()
    return tuple(p.strip() for p in value.split(",") if p.strip()) or None


def _first_offered(preference: Sequence[str], candidates: dict, shape_key: str) -> str:
    for name in preference:
        if name in candidates:
            return name
    raise KernelChoiceError(f"{shape_key}: none of the forced/pinned paths {list(preference)} "
                            f"(from {FORCE_ENV} or a pin) is offered; this layer's paths: "
                            f"{sorted(candidates)}")


def _pow2(x: int) -> int:
    return 1 << max(0, round(math.log2(max(int(x), 1))))


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _digest(choices: dict) -> str:
    return hashlib.sha256(_canonical(choices).encode()).hexdigest()
