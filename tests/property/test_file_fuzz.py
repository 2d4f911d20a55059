"""Fuzzing the file reader (issue 5): random truncations, byte flips and JSON mutations of a valid
file never produce anything but a lowbit error or a model identical to the saved one, and never
allocate much more than the file plus the model (checked in a subprocess under an address-space
limit)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.format import encode_header

FUZZ_EXAMPLES = 150
# headroom for the subprocess beyond its own address space after setup: the file is ~60 KB and the
# model ~0.3 MB, so 256 MB of extra address space catches any attempt to allocate from a crafted size
ADDRESS_HEADROOM = 256 << 20


def skeleton() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.Linear(64, 8))


@pytest.fixture(scope="module")
def good():
    m = lowbit.quantize(lowbit.quantize(skeleton(), "w4g32", targets=["Linear"], verbose=False),
                        "w8r", targets=["Embedding"], verbose=False)
    folder = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    path = lowbit.save(m, folder / "good.safetensors")
    ids = torch.tensor([[1, 5, 63]])
    return path.read_bytes(), m(ids), ids, folder


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats()
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def mutate_json(doc: dict, data) -> None:
    """Replace or delete one value at a random path of the lowbit document."""
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.booleans()):
            del node[key]
        else:
            node[key] = data.draw(JSON_VALUES)
        return


def check(raw: bytes, good, tag: str) -> None:
    _, want, ids, folder = good
    path = folder / f"case-{tag}.safetensors"
    path.write_bytes(raw)
    try:
        loaded = lowbit.load(path, skeleton())
    except LowbitError:
        return
    assert torch.equal(loaded(ids), want), "a mutated file loaded to a different model"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["truncate", "flip", "json", "json-sealed"]), data=st.data())
def test_mutated_files_give_a_lowbit_error_or_the_same_model(good, kind, data):
    raw = good[0]
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1:]
    else:
        header, body = split(raw)
        doc = json.loads(header["__metadata__"]["lowbit"])
        mutate_json(doc, data)
        header["__metadata__"]["lowbit"] = (encode_header(doc)["lowbit"] if kind == "json-sealed"
                                            else json.dumps(doc))
        raw = join(header, body)
    check(raw, good, kind)


def test_crafted_sizes_allocate_nothing_large(good, tmp_path):
    """In a subprocess capped at its own address space + ADDRESS_HEADROOM: crafted shapes and
    sizes (sealed, so only the deeper checks can stop them) fail with a lowbit error."""
    raw, _, _, folder = good
    script = textwrap.dedent(f"""
        import json, resource, struct, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch, lowbit
        from lowbit.errors import LowbitError
        from lowbit.io.format import encode_header
        from test_file_fuzz import skeleton, split, join
        raw = open({str(folder / "good.safetensors")!r}, "rb").read()
        lowbit.load({str(folder / "good.safetensors")!r}, skeleton())   # warm up every import
        vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + {ADDRESS_HEADROOM}, vm + {ADDRESS_HEADROOM}))
        cases = []
        for edit in ("shape", "tensor_shape", "offsets"):
            header, body = split(raw)
            doc = json.loads(header["__metadata__"]["lowbit"])
            if edit == "shape":
                doc["layers"]["1"]["shape"] = [2**31, 2**20]
            elif edit == "tensor_shape":
                header["1.qdata"]["shape"] = [2**40, 16]
            else:
                header["1.qdata"]["data_offsets"] = [0, 2**50]
            header["__metadata__"]["lowbit"] = encode_header(doc)["lowbit"]
            path = {str(tmp_path)!r} + "/" + edit + ".safetensors"
            open(path, "wb").write(join(header, body))
            try:
                lowbit.load(path, skeleton())
                cases.append(edit + ": loaded")
            except LowbitError as exc:
                cases.append(edit + ": ok")
            except MemoryError:
                cases.append(edit + ": MemoryError")
        print(json.dumps(cases))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["shape: ok", "tensor_shape: ok", "offsets: ok"]
