"""`eval.timing.interleaved`: every method timed once a round, the order rotating by one."""
from __future__ import annotations

from lowbit.eval.timing import interleaved


def test_interleaved_rotates_the_order_so_each_method_takes_each_position():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    t = interleaved(fns, rounds=6, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, once each
    timed = calls[3:]
    assert [timed[i:i + 3] for i in range(0, 18, 3)] == [
        list("abc"), list("bca"), list("cab"), list("abc"), list("bca"), list("cab")]
    # each method at each position of a round equally often (twice in 6 rounds of 3)
    for pos in range(3):
        assert sorted(timed[r * 3 + pos] for r in range(6)) == list("aabbcc")
    assert {k: v.rounds for k, v in t.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(v.min_ms <= v.median_ms for v in t.values())
