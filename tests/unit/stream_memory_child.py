"""Child process of test_streaming_memory.py (not a test file). It caps its private memory with
RLIMIT_DATA at (its VmData after the imports) + BUDGET_MB, then (1) streams the checkpoint SRC
into OUT with `lowbit.streaming.quantize_checkpoint`, recording the peak RSS growth (VmHWM reset
after the imports), and (2) under the same cap loads the same checkpoint whole with transformers'
from_pretrained (fp32), which must fail. Prints one JSON line."""
from __future__ import annotations

import json
import traceback
import resource
import sys
from pathlib import Path


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def attempt(fn) -> str | None:
    """None when ``fn()`` ran; else the allocation error it raised."""
    try:
        fn()
    except (MemoryError, RuntimeError, OSError) as exc:
        traceback.print_exc()
        return f"{type(exc).__name__}: {str(exc)[-2000:]}"  # whole: a long tmp path once cut "memory" off
    return None


def main(src: str, out: str, budget_mb: float) -> None:
    import torch
    import transformers
    from lowbit.streaming import quantize_checkpoint
    torch.set_num_threads(1)
    transformers.LlamaForCausalLM  # resolve the lazy import before the cap
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = status_kb("VmRSS")
    cap = (status_kb("VmData") + int(budget_mb * 1024)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    stream_error = attempt(lambda: quantize_checkpoint(src, "w4g128", out, progress=False))
    peak = (status_kb("VmHWM") - rss0) / 1024
    whole_error = attempt(lambda: transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32))
    print(json.dumps({"stream_error": stream_error, "stream_peak_growth_mb": peak,
                      "whole_error": whole_error}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
