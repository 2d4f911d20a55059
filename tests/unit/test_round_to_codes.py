"""`primitives.affine.round_to_codes` (the 2**23 rounding) equals ``torch.round`` then ``.to(uint8)``
on every kind of value it can be handed: all halves and integers of [0, 255], the floats next to
them, seeded random values, signed zero; and `quantize_codes` keeps clamping before rounding."""
from __future__ import annotations

import torch

from lowbit.primitives.affine import quantize_codes, round_to_codes
from lowbit.spec import parse_scheme


def reference(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t).to(torch.uint8)


def test_every_half_integer_and_neighbour_in_range():
    grid = torch.arange(0, 255.5, 0.5)  # 0, 0.5, 1, ..., 255: every tie and every integer
    up = torch.nextafter(grid, torch.full_like(grid, 300.0)).clamp(max=255.0)
    down = torch.nextafter(grid, torch.full_like(grid, -1.0)).clamp(min=0.0)
    t = torch.cat([grid, up, down, torch.tensor([-0.0, 0.0])])
    assert torch.equal(round_to_codes(t.clone()), reference(t))
    assert round_to_codes(torch.tensor([0.5, 1.5, 2.5, 254.5])).tolist() == [0, 2, 2, 254]  # to even


def test_random_values():
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(100_000, generator=gen, dtype=torch.float64).float() * 255.0
    assert torch.equal(round_to_codes(t.clone()), reference(t))


def test_quantize_codes_matches_round_then_clamp():
    gen = torch.Generator().manual_seed(1)
    for scheme in ("w8", "w4g32", "w3g64", "w2g32", "w8-asym"):
        spec = parse_scheme(scheme)
        xg = torch.randn(8, 4, 64, generator=gen) * 3  # beyond the grid: both clamps are hit
        scale = torch.rand(8, 4, generator=gen) * 0.05 + 0.01
        zp = None if spec.symmetric else torch.rand(8, 4, generator=gen) * 2 ** spec.bits
        q = quantize_codes(xg, scale, zp, spec)
        z = float(1 << (spec.bits - 1)) if zp is None else zp.unsqueeze(-1)
        lo = 1 if spec.symmetric else 0
        want = torch.round(xg / scale.unsqueeze(-1) + z).clamp(lo, spec.qmax).to(torch.uint8)
        assert torch.equal(q, want) and q.min() == lo and q.max() == spec.qmax


def test_codes_into_a_row_block_of_a_larger_result():
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(6, 40, generator=gen) * 255.0
    out = torch.full((10, 40), 7, dtype=torch.uint8)
    got = round_to_codes(t.clone(), out=out[2:8])
    assert got.data_ptr() == out[2:8].data_ptr()
    assert torch.equal(out[2:8], reference(t)) and bool((out[:2] == 7).all() and (out[8:] == 7).all())
