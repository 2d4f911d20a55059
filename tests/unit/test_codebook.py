"""Product quantization primitives: seeded k-means, empty-cluster re-seeding, exact recovery,
assignment packing and the codebook layout's golden bytes."""
from __future__ import annotations

import pytest
import torch

from lowbit.primitives.codebook import (CODEBOOK_VERSION, CodebookError, CodebookWeight, _update,
                                        index_bytes, kmeans, pack_assignments, quantize_codebook,
                                        split_blocks, unpack_assignments)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(shape=(64, 128), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * 0.02


def test_split_blocks_takes_consecutive_columns():
    w = torch.arange(24.0).reshape(2, 12)
    pts = split_blocks(w, 4)
    assert pts.tolist()[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert pts.shape == (6, 4)
    conv = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)  # 12 input features per output
    assert torch.equal(split_blocks(conv, 4), pts)
    with pytest.raises(CodebookError, match="fc: block_size 5 .* dividing its 12 columns"):
        split_blocks(w, 5, "fc")


@pytest.mark.parametrize("init", ("kmeans++", "random"))
def test_kmeans_is_deterministic_under_a_seed(init):
    pts = split_blocks(weight(), 8)
    a, b = kmeans(pts, 32, gen(3), 5, init), kmeans(pts, 32, gen(3), 5, init)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    c = kmeans(pts, 32, gen(4), 5, init)
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_error_decreases_with_iterations():
    pts = split_blocks(weight((128, 256)), 8)
    errors = [kmeans(pts, 64, gen(1), n).error for n in (0, 1, 3, 10)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.9 * errors[0]  # measured 0.76 (7.13 -> 5.43): Lloyd's iterations do real work


def test_kmeans_tolerance_stops_early():
    pts = split_blocks(weight((128, 256)), 8)
    res = kmeans(pts, 16, gen(1), n_iter=200, tol=1e-3)
    assert 1 <= res.iterations < 200


def test_empty_cluster_is_reseeded_from_the_worst_point():
    pts = torch.tensor([[0.0, 0.0], [0.5, 0.0], [5.0, 5.0], [9.0, 9.0]])
    idx = torch.tensor([0, 0, 1, 1])  # cluster 2 empty
    err = torch.tensor([0.0, 0.25, 8.0, 8.0 + 24.0])
    cent, n_empty = _update(pts, idx, err, 3)
    assert n_empty == 1
    assert cent.tolist() == [[0.25, 0.0], [7.0, 7.0], [9.0, 9.0]]


def test_kmeans_with_duplicate_points_reseeds_and_recovers():
    """Random init on 4 distinct points repeated: duplicate picks leave empty clusters that are
    re-seeded; the error ends at zero."""
    base = torch.tensor([[0.0, 1.0], [2.0, 3.0], [-1.0, 5.0], [4.0, -2.0]])
    pts = base.repeat(50, 1)
    res = kmeans(pts, 4, gen(0), n_iter=10, init="random")
    assert res.reseeded > 0
    assert res.error == 0.0


@pytest.mark.parametrize("k,distinct", ((16, 16), (16, 5), (300, 300)))
def test_exact_recovery_with_at_most_k_distinct_blocks(k, distinct):
    blocks = torch.randn(distinct, 4, generator=gen(2)).half().float()  # exact in float16
    pick = torch.randint(distinct, (48, 16), generator=gen(3))  # (rows, n_blocks)
    w = blocks[pick].reshape(48, 64)
    cw = quantize_codebook(w, k, 4, gen(4), n_iter=5)
    assert torch.equal(cw.dequantize(), w)
    assert cw.assignments.shape == (48, 16 * index_bytes(k))


@pytest.mark.parametrize("k", (2, 256, 257, 65536))
def test_assignment_packing_round_trip(k):
    a = torch.randint(k, (7, 9), generator=gen(k))
    a[0, 0], a[0, 1] = 0, k - 1
    packed = pack_assignments(a, k)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 9 * index_bytes(k))
    assert torch.equal(unpack_assignments(packed, k), a)


def test_golden_bytes():
    """Hand-made: k=2 (1 byte per index) and k=301 (2 bytes, little-endian)."""
    cent = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float16)
    cw = CodebookWeight(cent, pack_assignments(torch.tensor([[1, 0], [0, 1]]), 2), (2, 4), 2)
    assert cw.assignments.flatten().tolist() == [1, 0, 0, 1]
    # float16 little-endian: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 0.25 = 0x3400
    assert list(bytes(cent.numpy().tobytes())) == [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0x00, 0x34]
    assert cw.dequantize().tolist() == [[0.5, 0.25, 1.0, -2.0], [1.0, -2.0, 0.5, 0.25]]
    assert cw.nbytes == 8 + 4
    a = pack_assignments(torch.tensor([[0x012C, 0x0001, 0x0100]]), 301)  # 300, 1, 256
    assert a.flatten().tolist() == [0x2C, 0x01, 0x01, 0x00, 0x00, 0x01]
    assert cw.meta() == {"format": "codebook", "version": CODEBOOK_VERSION, "shape": [2, 4],
                         "block_size": 2}


def test_tensors_meta_round_trip_and_checks():
    cw = quantize_codebook(weight((32, 3, 2, 2)), 16, 4, gen(), n_iter=3)
    back = CodebookWeight.from_tensors(cw.tensors(), cw.meta())
    assert torch.equal(back.dequantize(), cw.dequantize()) and back.shape == (32, 3, 2, 2)
    assert cw.nbytes == 16 * 4 * 2 + 32 * 3  # float16 centroids + one byte per block
    bad = dict(cw.tensors(), assignments=cw.assignments[:, :-1])
    with pytest.raises(CodebookError, match=r"conv.assignments: expected \(32, 3\) torch.uint8"):
        CodebookWeight.from_tensors(bad, cw.meta(), "conv")
    with pytest.raises(CodebookError, match="missing \\['centroids'\\]"):
        CodebookWeight.from_tensors({"assignments": cw.assignments}, cw.meta())
    with pytest.raises(CodebookError, match="version 2"):
        CodebookWeight.from_tensors(cw.tensors(), dict(cw.meta(), version=2))
    out_of_range = CodebookWeight(cw.centroids[:8], cw.assignments, cw.shape, 4)
    with pytest.raises(CodebookError, match="index 1[0-5] >= k=8"):
        out_of_range.check()


def test_kmeans_needs_a_generator_and_valid_k():
    pts = split_blocks(weight(), 8)
    with pytest.raises(CodebookError, match="explicit torch.Generator"):
        kmeans(pts, 4, None)
    with pytest.raises(CodebookError, match="unknown k-means init 'pp'"):
        kmeans(pts, 4, gen(), init="pp")
