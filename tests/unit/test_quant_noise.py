"""Quant-Noise: the input weight is never modified, proportions and masks are what they claim,
seeds reproduce, bad block sizes fail loudly."""
from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.quant_noise import QuantNoiseError, block_mask, block_noise, scalar_noise
from lowbit.primitives import fake_quantize
from lowbit.spec import parse_scheme

# a proportion measured on this many draws lies within this of p (binomial: ~4 sigma)
N_ROWS, N_COLS = 256, 512
P_TOL = 0.01


def weight(shape=(N_ROWS, N_COLS), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scalar_noise_replaces_a_proportion_by_fake_quantized_values():
    w = weight()
    spec = parse_scheme("w2")
    fq = fake_quantize(w, spec)
    out = scalar_noise(w, spec, 0.3, gen())
    took_fq = (out == fq) & (fq != w)
    assert torch.equal(torch.where(took_fq, fq, w), out)  # every value is either w or fq
    assert abs(took_fq.float().mean().item() - 0.3) < P_TOL  # w2 moves almost every weight


def test_scalar_noise_gradient_is_straight_through():
    w = weight().requires_grad_(True)
    scalar_noise(w, parse_scheme("w4g32"), 0.5, gen()).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min-max ranges clip nothing


@pytest.mark.parametrize("fn", ("scalar", "block"))
def test_noise_never_modifies_its_input(fn):
    w = weight(seed=1).requires_grad_(True)
    before = w.detach().clone()
    for step in range(3):
        out = (scalar_noise(w, parse_scheme("w2"), 0.5, gen(step)) if fn == "scalar"
               else block_noise(w, 0.5, 8, gen(step)))
        out.square().sum().backward()
    assert torch.equal(w.detach().view(torch.int32), before.view(torch.int32))


def test_block_noise_drops_whole_blocks_and_rescales():
    w = weight()
    p, bs = 0.25, 8
    out = block_noise(w, p, bs, gen(5))
    keep = block_mask((N_ROWS, N_COLS), p, bs, gen(5))
    assert torch.equal(out, w * keep / (1 - p))
    blocks = keep.view(N_ROWS, N_COLS // bs, bs)  # (rows, n_blocks, block)
    assert torch.equal(blocks.all(-1), blocks.any(-1))  # a block is kept or dropped whole
    assert abs((~blocks[..., 0]).float().mean().item() - p) < 2 * P_TOL


def test_block_noise_conv_uses_in_channels_times_kernel():
    w = weight((16, 3, 3, 3))  # 27 input features
    out = block_noise(w, 0.5, 9, gen())
    assert out.shape == w.shape
    with pytest.raises(QuantNoiseError, match=r"conv1: block_size 8 does not divide the 27 input.*\[1, 3, 9, 27\]"):
        block_noise(w, 0.5, 8, gen(), name="conv1")


def test_same_seed_same_noise_other_seed_other_noise():
    w = weight()
    assert torch.equal(block_noise(w, 0.1, 8, gen(7)), block_noise(w, 0.1, 8, gen(7)))
    assert not torch.equal(block_noise(w, 0.1, 8, gen(7)), block_noise(w, 0.1, 8, gen(8)))
    spec = parse_scheme("w4")
    assert torch.equal(scalar_noise(w, spec, 0.1, gen(7)), scalar_noise(w, spec, 0.1, gen(7)))


def test_p_zero_is_the_identity_and_bad_p_fails():
    w = weight()
    assert torch.equal(block_noise(w, 0.0, 8, gen()), w)
    assert torch.equal(scalar_noise(w, parse_scheme("w2"), 0.0, gen()), w)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(QuantNoiseError, match="fc: noise proportion p must be in"):
            block_noise(w, bad, 8, gen(), name="fc")
