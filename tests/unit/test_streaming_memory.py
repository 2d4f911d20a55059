"""A checkpoint larger than the memory a process may use is quantized from its shards
(`lowbit.streaming`): a child process caps its private memory (RLIMIT_DATA) at its baseline after
importing torch and transformers plus BUDGET_MB; the model (random, seeded, written here as bf16
safetensors shards) is larger than that cap both as a file and as the fp32 model; streaming
succeeds with its peak RSS growth under the cap, and loading the model whole under the same cap
fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from lowbit.checkpoint import float_skeleton  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

BUDGET_MB = 100  # private memory the child may add after its imports
PEAK_BLOCKS_MAX = 3  # streaming's peak RSS growth, in fp32 blocks (measured: 2.2)
LAYERS, HIDDEN, FFN = 8, 640, 2560  # one block: 6.6M params, 26 MB fp32; the model: 215 MB fp32
CHILD = Path(__file__).with_name("stream_memory_child.py")


def write_checkpoint(folder: Path) -> int:
    """A random Llama as bf16 safetensors, one shard per block plus one for the rest; returns
    the bytes of its fp32 parameters."""
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FFN,
                                   num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in float_skeleton(folder).state_dict().items():
        part = k.split(".")[2] if k.startswith("model.layers.") else "rest"
        shards.setdefault(part, {})[k] = torch.randn(v.shape, generator=g, dtype=torch.bfloat16) * 0.02
    weight_map = {}
    for i, tensors in enumerate(shards.values()):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(t.numel() for s in shards.values() for t in s.values()) * 4


def test_a_checkpoint_larger_than_the_memory_cap_streams_and_a_whole_load_does_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    fp32_bytes = write_checkpoint(src)
    file_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert file_bytes > BUDGET_MB * 2**20 and fp32_bytes > 2 * BUDGET_MB * 2**20
    # glibc raises its mmap threshold after each large free, so later large tensors come from the
    # heap, whose freed, never-touched pages stay in VmData (what RLIMIT_DATA counts) though not
    # resident; a fixed threshold makes the cap count memory in use (for both paths alike)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, str(CHILD), str(src), str(tmp_path / "out"), str(BUDGET_MB)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["stream_error"] is None
    block_mb = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN) * 4 / 2**20
    assert got["stream_peak_growth_mb"] < min(BUDGET_MB, PEAK_BLOCKS_MAX * block_mb)
    assert got["whole_error"] is not None and "memory" in got["whole_error"].lower()
    import lowbit
    doc = lowbit.io.read_header(tmp_path / "out")
    assert len(doc["layers"]) == 7 * LAYERS  # every block Linear; the output head kept float
    model = lowbit.load(tmp_path / "out")
    assert type(model.model.layers[LAYERS - 1].mlp.down_proj).__name__ == "QLinear"
