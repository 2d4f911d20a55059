"""lowbit.quant_noise: noise only in training, computed in forward (the stored weights and the state
dict never change), seeded, removable, and a clear error for a block size that does not divide."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.quant_noise import QuantNoiseError
from lowbit.nn.noisy import NoisyConv2d, NoisyEmbedding, NoisyLinear


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 16)
        self.conv = torch.nn.Conv2d(2, 4, 2)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids, img):
        return self.fc(self.emb(ids)).sum() + self.conv(img).sum()


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(20, (4, 5), generator=g), torch.randn(2, 2, 4, 4, generator=g)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("block_size", (None, 4))
def test_state_dict_unchanged_by_noisy_training_and_eval_is_float(block_size):
    m = Net()
    before, keys = snapshot(m), list(m.state_dict())
    with torch.no_grad():
        m.eval()
        want = m(*inputs())
    handle = lowbit.quant_noise(m, p=0.5, block_size=block_size)
    assert isinstance(m.fc, NoisyLinear) and isinstance(m.conv, NoisyConv2d)
    assert isinstance(m.emb, NoisyEmbedding) and list(m.state_dict()) == keys
    opt = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)  # no updates: nothing may change
    m.train()
    outs = []
    for _ in range(3):
        opt.zero_grad()
        out = m(*inputs())
        out.backward()
        opt.step()
        outs.append(out.item())
    assert len(set(outs)) == 3  # a fresh noise draw every step
    assert m.fc.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0
    after = snapshot(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(*inputs()), want)
    handle.remove()
    assert type(m.fc) is torch.nn.Linear and type(m.emb) is torch.nn.Embedding


def test_seeded_and_removed_by_p_zero():
    runs = []
    for _ in range(2):
        m = Net()
        lowbit.quant_noise(m, p=0.3, scheme="w4", seed=7)
        m.train()
        runs.append(m(*inputs()).item())
    assert runs[0] == runs[1]
    lowbit.quant_noise(m, p=0)
    assert type(m.fc) is torch.nn.Linear and type(m.conv) is torch.nn.Conv2d


def test_optimizer_updates_are_the_only_change():
    """A noisy step changes the weights exactly as the optimizer applying the same gradients to an
    untouched copy does."""
    m, ref = Net(), Net()
    lowbit.quant_noise(m, p=0.2, block_size=2, targets=["fc"])
    assert type(m.conv) is torch.nn.Conv2d  # not targeted
    opt, ref_opt = (torch.optim.Adam(x.parameters(), lr=0.1) for x in (m, ref))
    m.train()
    for _ in range(2):
        opt.zero_grad()
        m(*inputs()).backward()
        for n, p in ref.named_parameters():
            p.grad = m.get_parameter(n).grad.clone()
        opt.step()
        ref_opt.step()
    for n, p in ref.named_parameters():
        assert torch.equal(m.get_parameter(n), p)


def test_block_size_must_divide_and_targets_must_match():
    m = Net()
    with pytest.raises(QuantNoiseError, match=r"fc: block_size 3 does not divide the 16 input "
                                              r"features.*valid block sizes: \[1, 2, 4, 8, 16\]"):
        lowbit.quant_noise(m, p=0.1, block_size=3, targets=["fc"])
    assert type(m.fc) is torch.nn.Linear
    with pytest.raises(QuantNoiseError, match="match no Linear"):
        lowbit.quant_noise(m, p=0.1, targets=["fcc"])
    with pytest.raises(QuantNoiseError, match=r"p must be in \[0, 1\)"):
        lowbit.quant_noise(m, p=1.0)
