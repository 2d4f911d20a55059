"""Sequential GPTQ's working memory grows with one block, not with the model: peak RSS of a fresh
subprocess (VmHWM, reset after the model and data are built) quantizing a tiny Llama with 3 and
with 15 blocks, sequential and one-shot. The MLP is wide (in_features 1024) so that each block's
down_proj Hessian (its float64 upper-triangle sum, 4.5 MiB; 4 MiB in float32 once finished)
dominates everything else the run allocates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("needs Linux /proc to reset and read the peak RSS", allow_module_level=True)

BLOCK_HESSIAN_MIB = 4.0
MORE_BLOCKS = 12  # 3 -> 15 blocks
# one-shot keeps 12 more blocks' Hessians (about 54 MiB); sequential keeps one block's at a time,
# so its peak may grow by allocator noise only (measured -7..-5 from 3 to 6 blocks, once +14.9
# inside the full suite: the bound, 24 MiB, stays above that noise)
SEQUENTIAL_GROWTH_MAX_MIB = 0.5 * MORE_BLOCKS * BLOCK_HESSIAN_MIB
ONE_SHOT_GROWTH_MIN_MIB = 0.75 * MORE_BLOCKS * BLOCK_HESSIAN_MIB
TIMEOUT_S = 300

# one fresh process measures every case in turn; between cases everything is freed and
# malloc_trim hands free heap back (the 8 MiB Hessians are mmapped: freed at once anyway)
SCRIPT = r"""
import ctypes, gc, json
from pathlib import Path
import torch, transformers
import lowbit
torch.set_num_threads(1)

def model(layers):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1024,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) / 1024

g = torch.Generator().manual_seed(1)
data = [{"input_ids": torch.randint(0, 64, (1, 32), generator=g)} for _ in range(4)]
lowbit.quantize(model(2), "w4g32", method="gptq", data=data, sequential=True, verbose=False)  # warm-up
out = {}
for layers, sequential in ((3, False), (15, False), (3, True), (15, True)):
    m = model(layers)
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    lowbit.quantize(m, "w4g32", method="gptq", data=data, sequential=sequential, verbose=False)
    out[f"{layers}-{sequential}"] = status("VmHWM:") - before
    del m
print(json.dumps(out))
"""


def peak_growths() -> dict[str, float]:
    """``"<blocks>-<sequential>"`` -> peak RSS over the RSS before `quantize`, MiB."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sequential_peak_memory_grows_with_one_block_not_the_model():
    peaks = peak_growths()
    one_shot = peaks["15-False"] - peaks["3-False"]
    sequential = peaks["15-True"] - peaks["3-True"]
    assert one_shot >= ONE_SHOT_GROWTH_MIN_MIB, f"the measurement sees no Hessians ({one_shot:.1f} MiB)"
    assert sequential <= SEQUENTIAL_GROWTH_MAX_MIB, \
        f"sequential peak grew {sequential:.1f} MiB for {MORE_BLOCKS} more blocks (one-shot: {one_shot:.1f})"
