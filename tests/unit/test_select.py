"""`kernels.select`: host description and cache key, cache validity and atomic writes, forcing and
pinning. Candidates here are plain callables that record their calls, so nothing depends on speed:
the "slow" one sleeps 20 ms a call, far beyond any timing noise of a no-op."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from lowbit.kernels import select

SLOW_S = 0.02
REAL_OVERSUBSCRIBED = select.oversubscribed  # conftest replaces it in every test


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    monkeypatch.delenv(select.FORCE_ENV, raising=False)


def recording(calls: list, name: str, sleep_s: float = 0.0):
    def run(m: int) -> None:
        calls.append((name, m))
        if sleep_s:
            time.sleep(sleep_s)
    return run


def must_not_run(m: int) -> None:
    raise AssertionError("a cached, forced or pinned choice must not time candidates")


def candidates(calls: list) -> dict:
    return {"f32": recording(calls, "f32", SLOW_S), "w8a8": recording(calls, "w8a8")}


def test_describe_host_names_cpu_flags_torch_and_threads():
    host = select.describe_host()
    assert set(host) == {"cpu", "flags", "capability", "torch", "threads", "code"}
    assert host["code"] == select.code_digest() and len(host["code"]) == 12
    assert host["torch"] == torch.__version__ and host["threads"] == torch.get_num_threads()
    assert set(host["flags"]) <= set(select.RELEVANT_FLAGS) and host["cpu"]
    assert host["capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("field,value", [("torch", "2.99.0"), ("threads", 64), ("cpu", "Other CPU"),
                                         ("flags", ["avx2"]), ("capability", "DEFAULT"),
                                         ("code", "000000000000")])
def test_host_key_changes_with_each_field(field, value):
    host = select.describe_host()
    assert select.host_key({**host, field: value}) != select.host_key(host)
    assert select.host_key(dict(reversed(list(host.items())))) == select.host_key(host)


def test_shape_class_and_row_buckets():
    assert select.shape_class("w8a8", 8, None, 384, 1536) == "w8a8/w8g0/512x2048"
    assert select.shape_class("bf16", 4, 128, 300, 4096) == "bf16/w4g128/256x4096"
    labels = [select.row_bucket(r)[0] for r in (0, 1, 2, 8, 9, 32, 33, 512, 513, 100000)]
    assert labels == ["1", "1", "2-8", "2-8", "9-32", "9-32", "33-128", "129-512", "513+", "513+"]
    assert select.row_bucket(20) == ("9-32", 16)


def test_choice_is_timed_once_then_read_from_the_cache_file(tmp_path):
    calls: list = []
    sel = select.KernelSelector(tmp_path)
    assert sel.choose("w8a8/w8g0/512x512", 20, candidates(calls)) == "w8a8"
    assert {m for _, m in calls} == {16}  # the bucket's representative M
    assert len([c for c in calls if c[0] == "w8a8"]) >= 2  # warm-up and at least one round
    data = json.loads(sel.path().read_text())
    assert data["version"] == select.CACHE_VERSION and data["host"] == sel.host()
    assert data["choices"]["w8a8/w8g0/512x512"]["9-32"]["path"] == "w8a8"
    assert data["choices"]["w8a8/w8g0/512x512"]["9-32"]["ms"]["f32"] >= SLOW_S * 1e3
    fresh = select.KernelSelector(tmp_path)  # another process: the file answers
    assert fresh.choose("w8a8/w8g0/512x512", 30, {"f32": must_not_run, "w8a8": must_not_run}) == "w8a8"
    assert fresh.cached_choices()[0]["path"] == "w8a8" and fresh.cached_choices()[0]["bucket"] == "9-32"
    assert select.cached_choices(tmp_path) == fresh.cached_choices()


def test_other_threads_or_torch_version_use_another_file(tmp_path, monkeypatch):
    sel = select.KernelSelector(tmp_path)
    sel.choose("k", 1, candidates([]))
    first = sel.path()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        calls: list = []
        assert sel.path() != first
        sel.choose("k", 1, candidates(calls))
        assert calls, "a different thread count must be timed again"
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    calls = []
    select.KernelSelector(tmp_path).choose("k", 1, candidates(calls))
    assert calls, "a different torch build must be timed again"
    assert len(list(tmp_path.glob("kernels-*.json"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "checksum", "host", "version"])
def test_an_invalid_cache_file_is_ignored_and_rewritten(tmp_path, damage):
    sel = select.KernelSelector(tmp_path)
    sel.choose("k", 1, candidates([]))
    data = json.loads(sel.path().read_text())
    if damage == "garbage":
        sel.path().write_bytes(b"\x00{not json")
    else:
        if damage == "checksum":
            data["choices"]["k"]["1"]["path"] = "f32"
        elif damage == "host":
            data["host"]["cpu"] = "Some Other CPU"
        else:
            data["version"] = 0
        sel.path().write_text(json.dumps(data))
    calls: list = []
    fresh = select.KernelSelector(tmp_path)
    assert fresh.choose("k", 1, candidates(calls)) == "w8a8" and calls
    assert select.read_cache(fresh.path(), fresh.host())["k"]["1"]["path"] == "w8a8"


def test_write_is_atomic(tmp_path, monkeypatch):
    sel = select.KernelSelector(tmp_path)
    sel.choose("k", 1, candidates([]))
    before = sel.path().read_bytes()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(select.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        select.write_cache(sel.path(), sel.host(), {"k": {"1": {"path": "f32", "ms": {}}}})
    assert sel.path().read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [sel.path().name]  # no temporary left behind


def test_lowbit_kernel_forces_the_first_offered_path(tmp_path, monkeypatch):
    monkeypatch.setenv(select.FORCE_ENV, "int4mm, f32")
    sel = select.KernelSelector(tmp_path)
    assert sel.choose("k", 64, {"f32": must_not_run, "w8a8": must_not_run}) == "f32"
    monkeypatch.setenv(select.FORCE_ENV, "int4mm")
    with pytest.raises(select.KernelChoiceError, match=r"k: none of .*'int4mm'.*paths: \['f32', 'w8a8'\]"):
        sel.choose("k", 64, {"f32": must_not_run, "w8a8": must_not_run})
    assert not list(tmp_path.iterdir())  # forcing neither times nor writes


def test_pinned_selector_is_deterministic_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(select.CACHE_ENV, str(tmp_path))
    sel = select.KernelSelector.pinned(["bf16", "f32"])
    assert sel.choose("k", 1, {"f32": must_not_run, "bf16": must_not_run}) == "bf16"
    assert sel.choose("k", 9999, {"f32": must_not_run, "w8a8": must_not_run}) == "f32"
    assert not list(tmp_path.iterdir())


def test_cache_dir_env_moves_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(select.CACHE_ENV, str(tmp_path / "c"))
    sel = select.KernelSelector()
    sel.choose("k", 1, candidates([]))
    assert sel.path().parent == tmp_path / "c" and sel.path().is_file()
    sel.clear()
    assert not sel.path().exists() and sel.cached_choices() == []


def test_capability_only_orders_candidates():
    names = ["bf16", "f32", "w8a8"]
    assert select.order_candidates(names, {"flags": ["avx512_bf16", "avx512_vnni"]}) == names
    assert select.order_candidates(names, {"flags": ["avx2"]}) == ["f32", "bf16", "w8a8"]
    calls: list = []
    host_without = {"flags": []}
    slow_first = {"bf16": recording(calls, "bf16"), "f32": recording(calls, "f32", SLOW_S)}
    assert select.order_candidates(list(slow_first), host_without) == ["f32", "bf16"]
    ms = select.time_candidates(slow_first, 4, budget_s=0.05)
    assert ms["bf16"] < ms["f32"]  # still timed, and the fast one wins whatever the order


def test_a_candidate_far_slower_in_the_first_rounds_is_not_timed_again():
    calls: list = []
    ms = select.time_candidates({"fast": recording(calls, "fast"),
                                 "slow": recording(calls, "slow", SLOW_S)}, 8, budget_s=0.01)
    assert [c for c in calls if c[0] == "slow"] == [("slow", 8)] * (1 + select.PRUNE_AFTER)
    assert len([c for c in calls if c[0] == "fast"]) >= 3 and ms["slow"] >= SLOW_S * 1e3


def test_one_preempted_call_does_not_decide():
    """The estimate is the least sample: one slow call (as when another job takes the CPU)
    neither prunes a candidate nor inflates its time."""
    calls: list = []

    def hiccup(m: int) -> None:
        calls.append(m)
        if len(calls) == 2:  # the first timed call
            time.sleep(SLOW_S)
    ms = select.time_candidates({"steady": recording([], "steady", 0.002), "hiccup": hiccup}, 4,
                                budget_s=0.0)
    assert len(calls) == 1 + select.PRUNE_AFTER and ms["hiccup"] < ms["steady"]


def test_decisions_of_another_process_are_kept_when_saving(tmp_path):
    first, second = select.KernelSelector(tmp_path), select.KernelSelector(tmp_path)
    first._choices(), second._choices()  # both loaded the empty cache
    first.choose("a", 1, candidates([]))
    second.choose("b", 1, candidates([]))
    shapes = {row["shape"] for row in select.cached_choices(tmp_path)}
    assert shapes == {"a", "b"}


def test_a_decision_timed_under_oversubscription_is_provisional_and_retimed_when_quiet(tmp_path, monkeypatch):
    sel = select.KernelSelector(tmp_path)
    calls: list = []
    monkeypatch.setattr(select, "oversubscribed", lambda: 9.5)  # load 9.5 on fewer cores
    assert sel.choose("w8a8/w8g0/512x512", 64, candidates(calls)) == "w8a8"
    entry = sel.timings("w8a8/w8g0/512x512", 64)
    assert entry["provisional"] is True and entry["load"] == 9.5
    timed = len(calls)
    assert sel.choose("w8a8/w8g0/512x512", 64, candidates(calls)) == "w8a8"  # still loaded: reused
    assert len(calls) == timed
    monkeypatch.setattr(select, "oversubscribed", lambda: None)
    fresh = select.KernelSelector(tmp_path)  # another process, on a quiet machine
    assert fresh.choose("w8a8/w8g0/512x512", 64, candidates(calls)) == "w8a8"
    assert len(calls) > timed  # timed again
    entry = fresh.timings("w8a8/w8g0/512x512", 64)
    assert "provisional" not in entry and "load" not in entry
    again = select.KernelSelector(tmp_path)
    assert again.choose("w8a8/w8g0/512x512", 64, {"f32": must_not_run, "w8a8": must_not_run}) == "w8a8"


def test_oversubscribed_reads_the_load_against_this_process_cores(monkeypatch):
    monkeypatch.setattr(select, "oversubscribed", REAL_OVERSUBSCRIBED)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(select.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert select.oversubscribed() == cores + 3.0
    monkeypatch.setattr(select.os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    monkeypatch.setattr(select, "_others_running", lambda: 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    assert select.oversubscribed() is None  # our threads fill the cores, nobody else runs
    monkeypatch.setattr(select, "_others_running", lambda: 1)  # a job started a moment ago
    assert select.oversubscribed() == cores + 1.0


def test_others_running_reads_proc_loadavg():
    others = select._others_running()
    assert others is None or others >= 0


def test_a_job_starting_during_the_timing_makes_the_decision_provisional(tmp_path, monkeypatch):
    sel = select.KernelSelector(tmp_path)
    readings = iter([None, 3.0])  # quiet before the timing, oversubscribed after it
    monkeypatch.setattr(select, "oversubscribed", lambda: next(readings))
    sel.choose("w8a8/w8g0/512x512", 64, candidates([]))
    assert sel.timings("w8a8/w8g0/512x512", 64)["provisional"] is True
