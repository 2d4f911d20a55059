"""Golden bytes of tiny tables (tables/format.py, FORMAT_VERSION 1), derived by hand from the shard
diagram and the scale-and-bias formulas in tables/quant.py; none comes from the code under test."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.tables import build, open_table
from lowbit.tables.format import FORMAT_VERSION, TableError, decode_header

# rows [0, 1, 2, 3] and [4, 2, 0, -2] at 2 bits, min-max:
#   row 0: lo 0, hi 3 -> scale 3/3 = 1.0 (fp16 0x3C00), bias 0.0; codes 0,1,2,3 -> 0b11_10_01_00 = 0xE4
#   row 1: lo -2, hi 4 -> scale 6/3 = 2.0 (0x4000), bias -2.0 (0xC000); codes 3,2,1,0 -> 0b00_01_10_11 = 0x1B
ROWS = [[0.0, 1.0, 2.0, 3.0], [4.0, 2.0, 0.0, -2.0]]
HEADER_DENSE = (b"LBTS" + bytes([1, 0]) + bytes([2]) + bytes([0]) + bytes([4, 0, 0, 0])
                + bytes([5, 0, 0, 0]) + bytes([2, 0, 0, 0, 0, 0, 0, 0]) + bytes(8))
RECORDS = bytes([0xE4, 0x00, 0x3C, 0x00, 0x00,  0x1B, 0x00, 0x40, 0x00, 0xC0])  # | codes | scale | bias |
GOLDEN_DENSE = HEADER_DENSE + RECORDS
# the same rows under keys 7 and -3 (text source): key order puts row 1 (key -3) first
NEG3, SEVEN = bytes([0xFD] + [0xFF] * 7), bytes([7] + [0] * 7)
GOLDEN_SPARSE = (b"LBTS" + bytes([1, 0, 2, 1, 4, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]) + NEG3
                 + NEG3 + SEVEN + RECORDS[5:] + RECORDS[:5])


def test_dense_table_bytes(tmp_path):
    np.save(tmp_path / "x.npy", np.array(ROWS, dtype=np.float32))
    build(tmp_path / "x.npy", tmp_path / "t", bits=2, progress=False)
    assert (tmp_path / "t" / "shard-00000.lbt").read_bytes() == GOLDEN_DENSE
    doc = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert (doc["format_version"], doc["rows"], doc["dim"], doc["record_bytes"], doc["dense_keys"]) == (
        FORMAT_VERSION, 2, 4, 5, True)
    assert open_table(tmp_path / "t").lookup([1, 0]).tolist() == [ROWS[1], ROWS[0]]


def test_sparse_table_bytes(tmp_path):
    (tmp_path / "x.txt").write_text("7\t0,1,2,3\n-3\t4,2,0,-2\n")
    build(tmp_path / "x.txt", tmp_path / "t", bits=2, progress=False)
    assert (tmp_path / "t" / "shard-00000.lbt").read_bytes() == GOLDEN_SPARSE
    assert open_table(tmp_path / "t").lookup([7, -3]).tolist() == ROWS


def test_header_decodes_hand_made_bytes():
    head = decode_header(GOLDEN_SPARSE, "golden")
    assert head == {"bits": 2, "dim": 4, "record_bytes": 5, "rows": 2, "first_key": -3,
                    "keys_stored": True, "key_dtype": "int64", "scale_dtype": "float16"}


@pytest.mark.parametrize("raw, msg", [(b"LBTS", "truncated"), (b"XXXX" + GOLDEN_DENSE[4:], "magic"),
                                      (b"LBTS" + bytes([2, 0]) + GOLDEN_DENSE[6:], "version 2")])
def test_bad_headers_are_named(raw, msg):
    with pytest.raises(TableError, match=msg):
        decode_header(raw, "shard-x")
