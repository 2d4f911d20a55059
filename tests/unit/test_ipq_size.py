"""The size report's byte count equals the tensor bytes of a safetensors file holding them."""
from __future__ import annotations

import json
import math
import struct

import torch
from safetensors.torch import save_file

from lowbit.ipq_size import size_report
from lowbit.primitives.codebook import CodebookWeight, pack_assignments, quantize_codebook


def gen(s=0):
    return torch.Generator().manual_seed(s)


def file_tensor_bytes(path) -> int:
    """Sum of the data byte ranges a safetensors header declares (the layout: u64 LE header
    length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__")
    assert len(raw) == 8 + n + total  # nothing but header and tensor data
    return total


def test_report_bytes_equal_the_file(tmp_path):
    cws = {"ffn.fc1": quantize_codebook(torch.randn(64, 32, generator=gen()), 16, 8, gen(1), 3),
           "ffn.fc2": quantize_codebook(torch.randn(32, 64, generator=gen(2)), 300, 4, gen(3), 2,
                                        centroid_dtype="float32")}
    floats = {"ffn.fc1.bias": torch.zeros(64), "head.weight": torch.zeros(10, 32, dtype=torch.float16)}
    tensors = {f"{n}.{k}": t.contiguous() for n, cw in cws.items() for k, t in cw.tensors().items()}
    tensors.update(floats)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    rep = size_report(cws, floats)
    assert rep.stored_bytes == file_tensor_bytes(path)
    # by hand: fc1 16*8*2 + 64*4*1 = 512; fc2 (k=300 > 256 -> 2 bytes) 300*4*4 + 32*16*2 = 5824
    assert [r.stored_bytes for r in rep.layers] == [512, 5824, 256, 640]
    assert rep.total("codebook") == ((64 * 32 + 32 * 64) * 4, 512 + 5824)


def test_theoretical_bits_and_ratio():
    cw = CodebookWeight(torch.zeros(256, 8, dtype=torch.float16),
                        pack_assignments(torch.zeros(384, 48, dtype=torch.long), 256), (384, 384), 8)
    (row,) = size_report({"l": cw}).layers
    assert row.theory_bits == 384 * 48 * 8 + 256 * 8 * 16  # log2(256) = 8 bits per block
    assert row.stored_bytes * 8 == row.theory_bits  # uint8 assignments: no waste at k = 256
    assert math.isclose(row.ratio, 384 * 384 * 4 / (384 * 48 + 4096))
    text = str(size_report({"l": cw}))
    assert "quantized layers" in text and f"{row.ratio:.1f}x" in text
