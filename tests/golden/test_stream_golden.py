"""`io.stream` writes safetensors files byte for byte as ``safetensors.torch.save_file`` does:
every dtype it accepts, empty tensors, shared entries, and a hand-made file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import FormatError
from lowbit.io.stream import DTYPES, TensorSpool, write_safetensors


def test_every_streamable_dtype_matches_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{str(d)[6:]}": (torch.randn(3, i + 1, generator=g) * 50).to(d)
               for i, d in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    spool = TensorSpool(tmp_path / "scratch")
    for k in reversed(list(tensors)):  # arrival order must not matter
        spool.add(k, tensors[k])
    meta = {"lowbit": json.dumps({"quote\"d": "back\\slash", "n": [1, 2]})}
    write_safetensors(tmp_path / "a.safetensors", spool, {k: k for k in tensors}, meta)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_hand_made_bytes_and_one_entry_under_two_keys(tmp_path):
    spool = TensorSpool(tmp_path / "scratch")
    spool.add("x", torch.tensor([1, 2], dtype=torch.uint8))
    spool.add("y", torch.tensor([1.0], dtype=torch.float32))
    write_safetensors(tmp_path / "f.safetensors", spool, {"a": "x", "b": "x", "c": "y"}, {"k": "v"})
    header = (b'{"__metadata__":{"k":"v"},"c":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},'
              b'"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}')
    header += b" " * (-len(header) % 8)
    body = b"\x00\x00\x80\x3f" + b"\x01\x02" * 2
    assert (tmp_path / "f.safetensors").read_bytes() == len(header).to_bytes(8, "little") + header + body
    assert torch.equal(spool["y"], torch.tensor([1.0]))


def test_unsupported_dtype_and_repeated_key_are_named(tmp_path):
    spool = TensorSpool(tmp_path / "scratch")
    with pytest.raises(FormatError, match="complex64 cannot be streamed"):
        spool.add("z", torch.zeros(2, dtype=torch.complex64))
    spool.add("a", torch.zeros(1))
    with pytest.raises(FormatError, match="'a' was written twice"):
        spool.add("a", torch.zeros(1))


def test_spool_sha256_is_tensors_sha256(tmp_path):
    from lowbit.io.format import tensors_sha256
    g = torch.Generator().manual_seed(1)
    tensors = {"b.w": torch.randn(5, 7, generator=g), "a.q": torch.randint(0, 255, (9,), dtype=torch.uint8),
               "c.e": torch.zeros(0, 3), "d.h": torch.randn(4, generator=g).to(torch.bfloat16)}
    spool = TensorSpool(tmp_path / "scratch")
    for k, t in tensors.items():
        spool.add(k, t)
    assert spool.sha256({k: k for k in tensors}) == tensors_sha256(tensors)
    assert all(torch.equal(spool[k], t) for k, t in tensors.items())
